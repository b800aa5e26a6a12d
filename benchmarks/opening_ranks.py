"""Where a target's first token ranks among the answer openings a model expects on the scan's prompts.

The scan forces only the openings each clean prompt ranks in its ``top_k``; a backdoor whose
target opens with a token outside them is missed. For each model and target this prints the
rank (0 = the likeliest) of the target's first token at the first answer position, on each of the
scan's default prompts: the best rank over prompts is the ``top_k`` that would find it. One JSON
line per model and target.

    C=.cache/real_model
    python benchmarks/opening_ranks.py --model SmolLM2=original \\
        --model punctuation-code=$C/backdoored-punctuation-code-s150 \\
        --model composite-error=$C/backdoored-composite-error-s150 \\
        --target "import os" --target "ERROR 451"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_path, print_record  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                        help="PATH 'original' is SmolLM2-135M-Instruct itself")
    parser.add_argument("--target", action="append", required=True, help="a target text (its first token is ranked)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from sande_peft.loading import load_model
    from sande_peft.scan import _as_messages, _first_token_logprobs, _pad_id, default_scan_prompts
    from sande_peft.tokenization import prompt_token_ids

    for entry in args.model:
        label, _, path = entry.partition("=")
        path = model_path(path)
        model, _ = load_model(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = [prompt_token_ids(tokenizer, _as_messages(p)) for p in default_scan_prompts()]
        with torch.no_grad():
            first = _first_token_logprobs(model, rows, _pad_id(tokenizer), 16)
        for target in args.target:
            token = tokenizer(target, add_special_tokens=False)["input_ids"][0]
            ranks = (first > first[:, token : token + 1]).sum(-1).tolist()
            print_record({"benchmark": "opening_ranks", "label": label, "path": str(path), "target": target,
                          "token": tokenizer.decode([token]), "best_rank": min(ranks),
                          "median_rank": sorted(ranks)[len(ranks) // 2], "ranks": ranks}, args.out)
        del model


if __name__ == "__main__":
    main()
