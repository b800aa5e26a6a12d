"""Merge a trained adapter into its base model and write a verified, self-contained model.

[`merge_and_export`] is the last step of every defence:

1. it rebuilds the base model in full precision. A 4-bit base is DEQUANTIZED, so the merged
   model computes exactly the function that was trained (merging onto a 4-bit base would
   re-quantize the sum and change it; merging onto the original full-precision weights
   would undo the quantization the adapter was trained against);
2. it merges the adapter with peft;
3. it compares the merged model's logits with base + adapter on a few inputs and reports
   the largest difference, refusing to write a model that does not match;
4. it writes safetensors into a temporary folder beside ``output_dir`` and renames it
   into place, so a failure or an interruption never leaves a folder that looks complete.

>>> import tempfile, os
>>> from peft import LoraConfig, get_peft_model
>>> from sande_peft.toy import toy_model, toy_tokenizer
>>> peft_model = get_peft_model(toy_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
>>> out = os.path.join(tempfile.mkdtemp(), "merged")
>>> report = merge_and_export(peft_model, out, tokenizer=toy_tokenizer())
>>> report.max_abs_logit_diff < 1e-4, "model.safetensors" in os.listdir(out)
(True, True)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bnb_compat import restore_trainable_4bit_layout

EXPORT_REPORT_NAME = "export_report.json"
DEFAULT_CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
)


class ExportCheckError(RuntimeError):
    """The merged model does not reproduce base + adapter: nothing was written."""


@dataclass
class ExportReport:
    """What [`merge_and_export`] wrote and how closely the merged model matches base + adapter."""

    output_dir: str
    base: str  # "full-precision" or "dequantized-4bit"
    dtype: str
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float
    n_check_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def full_precision_state_dict(base_model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The base model's weights as plain tensors in ``dtype``, adapters left out and 4-bit weights dequantized.

    Works on a bare model or on the base of a peft model (its ``base_layer`` names are mapped
    back to the original ones). Tensors are copies: the trained model is left untouched.
    """
    import bitsandbytes as bnb

    state = {}
    for module_name, module in base_model.named_modules():
        parts = module_name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue  # adapter weights travel in the adapter state dict
        for param_name, param in module.named_parameters(recurse=False):
            key = ".".join(p for p in parts + [param_name] if p and p != "base_layer")
            if isinstance(param, bnb.nn.Params4bit):
                data, quant_state = param.data, param.quant_state
                if getattr(quant_state, "packing_format_for_cpu", False):
                    # bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first eval
                    # forward; the plain layout must be restored before dequantizing. The inverse edits
                    # the quant state in place, so it works on copies: the model keeps its packed weights.
                    data, quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                        data.clone(), copy.deepcopy(quant_state)
                    )
                tensor = bnb.functional.dequantize_4bit(data, quant_state)
            else:
                tensor = param.data
            state[key] = tensor.detach().to("cpu", dtype=dtype, copy=True)
    return state


def _rebuild_full_precision(base_model, dtype: torch.dtype):
    """A fresh, unquantized copy of ``base_model`` in ``dtype``, built from its (dequantized) weights."""
    config = copy.deepcopy(base_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = full_precision_state_dict(base_model, dtype)
    model = type(base_model).from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    model.generation_config = copy.deepcopy(base_model.generation_config)
    return model.eval()


def _check_inputs(tokenizer, base_model, texts: Sequence[str] | None) -> torch.Tensor:
    if tokenizer is not None:
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        rows = [tok(t, add_special_tokens=True)["input_ids"] for t in (texts or DEFAULT_CHECK_TEXTS)]
        rows = [r for r in rows if r]
        if rows:
            width = min(len(r) for r in rows)  # equal lengths: no padding to get wrong
            return torch.tensor([r[:width] for r in rows])
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, base_model.config.get_text_config().vocab_size, (3, 16), generator=generator)


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return model(input_ids=input_ids.to(device)).logits.float().cpu()
    finally:
        model.train(was_training)
        if was_training:
            restore_trainable_4bit_layout(model)


def _load_adapter_model(adapter_dir: str, base_model, quantization_config, dtype):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    peft_config = PeftConfig.from_pretrained(adapter_dir)
    base = base_model if base_model is not None else peft_config.base_model_name_or_path
    if base is None:
        raise ValueError(
            f"The adapter in {adapter_dir} does not name its base model: pass `base_model=` (a path, an id or a model)."
        )
    if isinstance(base, (str, os.PathLike)):
        base = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization_config, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir)


def write_atomically(output_dir: str | os.PathLike, write, overwrite: bool = False) -> None:
    """Run ``write(tmp_dir)`` into a hidden sibling folder, then rename it to ``output_dir``.

    A failure removes the temporary folder; an interruption leaves only a hidden
    ``.<name>.partial-*`` folder, never a folder under the final name.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists. Pass `overwrite=True` to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        write(tmp)
        if output_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, trash / "old")
            os.replace(tmp, output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_and_export(
    model,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    base_model=None,
    quantization_config=None,
    dtype: torch.dtype = torch.float32,
    check_texts: Sequence[str] | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
    adapter_name: str = "default",
) -> ExportReport:
    """Merge a LoRA adapter into a full-precision base and write it, verified, as safetensors.

    Args:
        model: a trained [`~peft.PeftModel`] (for instance `trainer.model`), or the folder of a saved adapter.
        output_dir: where the merged model goes; written atomically.
        tokenizer: saved beside the model, and used to build the check inputs.
        base_model: for a saved adapter: the base model (path, id or model); defaults to the
            adapter's `base_model_name_or_path`.
        quantization_config: for a saved adapter trained on a 4-bit base: load the base with it,
            so the merge is done on the dequantized weights the adapter was trained against.
        dtype: dtype of the merged weights (float32 keeps the merge exact; bfloat16 halves the size).
        check_texts: texts whose logits are compared; a few built-in sentences by default.
        tolerance: the largest |logit difference| accepted. Default: 1e-4 times the largest
            |logit| for float32 (at least 1e-4), 2e-2 times it for lower precisions.
        overwrite: replace an existing ``output_dir``.

    Returns:
        [`ExportReport`], also written as ``export_report.json`` beside the weights.

    Raises:
        ExportCheckError: the merged model does not match; nothing is written.
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists. Pass `overwrite=True` to replace it.")
    if isinstance(model, (str, os.PathLike)):
        model = _load_adapter_model(str(model), base_model, quantization_config, dtype)
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"`model` must be a peft model with a trained adapter (or the folder of a saved adapter), got "
            f"{type(model).__name__}. A model trained without an adapter needs no merge: use `save_pretrained`."
        )
    base = model.get_base_model()
    quantized = _is_quantized(base)
    input_ids = _check_inputs(tokenizer, base, check_texts)
    reference = _logits(model, input_ids)

    merged = _rebuild_full_precision(base, dtype)
    peft_config = copy.deepcopy(model.peft_config[adapter_name])
    merged = get_peft_model(merged, peft_config, adapter_name=adapter_name)
    set_peft_model_state_dict(merged, get_peft_model_state_dict(model, adapter_name=adapter_name), adapter_name)
    for name, param in merged.named_parameters():  # the adapter may be bf16 (QLoRA): merge in the base's dtype
        if "lora_" in name:
            param.data = param.data.to(dtype)
    merged = merged.merge_and_unload()
    candidate = _logits(merged, input_ids)

    max_logit = reference.abs().max().item()
    diff = (candidate - reference).abs().max().item()
    if tolerance is None:
        exact = dtype == torch.float32 and not quantized and reference.dtype == torch.float32
        tolerance = max(1e-4, 1e-4 * max_logit) if exact else 2e-2 * max(1.0, max_logit)
    if not diff <= tolerance:
        raise ExportCheckError(
            f"The merged model's logits differ from base + adapter by up to {diff:.3g} (tolerance {tolerance:.3g}); "
            f"nothing was written to {output_dir}."
        )
    report = ExportReport(
        output_dir=str(output_dir),
        base="dequantized-4bit" if quantized else "full-precision",
        dtype=str(dtype).replace("torch.", ""),
        max_abs_logit_diff=diff,
        max_abs_logit=max_logit,
        tolerance=tolerance,
        n_check_tokens=int(input_ids.numel()),
    )

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        with open(folder / EXPORT_REPORT_NAME, "w") as f:
            json.dump(report.to_dict(), f, indent=2)

    write_atomically(output_dir, write, overwrite)
    return report
