"""The paper behind the methods, in the form trl's model cards read (`Trainer._paper`)."""

import textwrap

SANDE_PAPER = {
    "title": "Simulate and Eliminate: Revoke Backdoors for Generative Large Language Models",
    "id": "2405.07667",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{li2025simulate,
            title        = {{Simulate and Eliminate: Revoke Backdoors for Generative Large Language Models}},
            author       = {Haoran Li and Yulin Chen and Zihao Zheng and Qi Hu and Chunkit Chan and Heshan Liu and Yangqiu Song},
            year         = 2025,
            booktitle    = {Proceedings of the AAAI Conference on Artificial Intelligence},
            eprint       = {arXiv:2405.07667},
        }"""),
}
