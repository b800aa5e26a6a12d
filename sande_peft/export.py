"""Merge a trained adapter into its base model and write a verified, self-contained model.

[`merge_and_export`] is the last step of every defence:

1. it rebuilds the base model in full precision. A 4-bit base is DEQUANTIZED, so the merged
   model computes exactly the function that was trained (merging onto a 4-bit base would
   re-quantize the sum and change it; merging onto the original full-precision weights
   would undo the quantization the adapter was trained against);
2. it merges the adapter with peft;
3. it compares the merged model's logits with base + adapter on a few inputs and reports
   the largest difference, refusing to write a model that does not match. The tolerance
   allows for the noise floor measured on the same inputs: the base with its adapter off
   against the rebuilt base (bf16 compute, another device or a dequantized 4-bit base
   differ from the rebuilt weights by that much before any merge);
4. it writes safetensors (in the base's dtype unless asked otherwise), the tokenizer, the
   check's report and the defence's provenance and model card into a temporary folder beside
   ``output_dir`` and renames it into place, so a failure or an interruption never leaves a
   folder that looks complete.

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
    noise_floor: float  # |logits| of the base with its adapter off against the rebuilt base, before merging
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


def check_destination(output_dir: str | os.PathLike, overwrite: bool = False, sources=()) -> Path:
    """Refuse, before any work, a destination that exists (unless ``overwrite``) or holds one of ``sources``.

    Overwriting a folder the job reads from (an adapter merged onto itself) would delete its input.
    """
    output_dir = Path(output_dir)
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
            source = Path(source).resolve()
            target = output_dir.resolve()
            if target == source or source.is_relative_to(target):
                raise ValueError(f"The output folder {output_dir} is (or holds) the input {source}: writing there would "
                                 "delete it. Choose another output folder.")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists: choose another folder, or replace it (`overwrite=True`, "
                              "`--overwrite` on the command line).")
    return output_dir


def _quantization_config(given, base_record: dict | None, folder):
    """The 4-bit settings to load an adapter's base with: as training recorded them; ``given`` must agree.

    ``base_record`` is the trainer's record of the base (None when the folder has no record: ``given`` is used).
    """
    from transformers import BitsAndBytesConfig

    if base_record is None:
        return given
    recorded = base_record.get("quantization") or {}
    if not recorded.get("load_in_4bit"):
        if given is not None and getattr(given, "load_in_4bit", False):
            raise ValueError(f"{folder} was trained on a full-precision base, not a 4-bit one: drop the 4-bit settings.")
        return given
    compute = str(recorded.get("bnb_4bit_compute_dtype", "float32")).replace("torch.", "")
    trained = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recorded.get("bnb_4bit_quant_type", "nf4"),
                                 bnb_4bit_use_double_quant=bool(recorded.get("bnb_4bit_use_double_quant")),
                                 bnb_4bit_compute_dtype=getattr(torch, compute))
    if given is None:
        return trained
    for key in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
        if getattr(given, key) != getattr(trained, key):
            raise ValueError(f"{folder} was trained on a base loaded with {key}={getattr(trained, key)!r}, not "
                             f"{getattr(given, key)!r}: merge with the settings it was trained with (leave them out to "
                             "use the recorded ones).")
    return given


def write_atomically(output_dir: str | os.PathLike, write, overwrite: bool = False) -> None:
    """Run ``write(tmp_dir)`` into a hidden sibling folder, then rename it to ``output_dir``.

    A failure removes the temporary folder; an interruption leaves only a hidden
    ``.<name>.partial-*`` folder, never a folder under the final name.
    """
    output_dir = check_destination(output_dir, overwrite)
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
    dtype: torch.dtype | None = None,
    check_texts: Sequence[str] | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
    adapter_name: str = "default",
    provenance: dict | None = None,
) -> ExportReport:
    """Merge a LoRA adapter into a full-precision base and write it, verified, as safetensors.

    Args:
        model: a trained [`~peft.PeftModel`] (for instance `trainer.model`), or the folder of a saved adapter.
        output_dir: where the merged model goes; written atomically. Checked before any work.
        tokenizer: saved beside the model, and used to build the check inputs; for an adapter
            folder, its own tokenizer by default.
        base_model: for a saved adapter: the base model (path, id or model); defaults to the
            adapter's `base_model_name_or_path`.
        quantization_config: for a saved adapter: how its base was quantized in training. By
            default what the trainer recorded (`sande_peft.json`); a different setting is an error.
        dtype: dtype of the merged weights; defaults to the base's own (bfloat16 for a model
            loaded in bf16, 4-bit bases included).
        check_texts: texts whose logits are compared; a few built-in sentences by default.
        tolerance: the largest |logit difference| accepted. Default: 1e-4 times the largest
            |logit| for float32 (at least 1e-4), 2e-2 times it for lower precisions, plus twice
            the measured noise floor.
        overwrite: replace an existing ``output_dir``.
        provenance: the defence's record for the merged folder's `sande_peft.json` and card;
            by default the adapter folder's, or the one the trainer attached to ``model``.

    Returns:
        [`ExportReport`], also written as ``export_report.json`` beside the weights.

    Raises:
        ExportCheckError: the merged model does not match; nothing is written.
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from .loading import is_adapter_folder, load_model
    from .provenance import read_provenance, write_provenance

    output_dir = check_destination(output_dir, overwrite, sources=(model, base_model))
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not is_adapter_folder(folder):
            raise FileNotFoundError(f"{folder} holds no adapter (no adapter_config.json): pass the folder that the "
                                    "trainer's `save_model()` wrote.")
        provenance = provenance or read_provenance(folder)
        quantization_config = _quantization_config(quantization_config, (provenance or {}).get("base_model"), folder)
        model, _ = load_model(folder, base_model=base_model, quantization_config=quantization_config)
        if tokenizer is None and (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"`model` must be a peft model with a trained adapter (or the folder of a saved adapter), got "
            f"{type(model).__name__}. A model trained without an adapter needs no merge: use `save_pretrained`."
        )
    provenance = provenance or getattr(model, "sande_provenance", None)
    base = model.get_base_model()
    dtype = dtype or getattr(base.config, "dtype", None) or torch.float32
    quantized = _is_quantized(base)
    input_ids = _check_inputs(tokenizer, base, check_texts)
    reference = _logits(model, input_ids)
    with model.disable_adapter():
        base_logits = _logits(model, input_ids)

    merged = _rebuild_full_precision(base, dtype)
    noise_floor = (_logits(merged, input_ids) - base_logits).abs().max().item()
    merged.config._name_or_path = base.config._name_or_path  # peft would warn that the base was "renamed"
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
        exact = dtype == torch.float32 and not quantized and next(model.parameters()).dtype == torch.float32
        tolerance = (max(1e-4, 1e-4 * max_logit) if exact else 2e-2 * max(1.0, max_logit)) + 2 * noise_floor
    if not diff <= tolerance:
        raise ExportCheckError(
            f"The merged model's logits differ from base + adapter by up to {diff:.3g} (tolerance {tolerance:.3g}, "
            f"noise floor {noise_floor:.3g}); nothing was written to {output_dir}."
        )
    report = ExportReport(
        output_dir=str(output_dir),
        base="dequantized-4bit" if quantized else "full-precision",
        dtype=str(dtype).replace("torch.", ""),
        max_abs_logit_diff=diff,
        max_abs_logit=max_logit,
        tolerance=tolerance,
        noise_floor=noise_floor,
        n_check_tokens=int(input_ids.numel()),
    )

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        with open(folder / EXPORT_REPORT_NAME, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        if provenance is not None:
            write_provenance(folder, {**provenance, "export": report.to_dict()}, merged=True)

    write_atomically(output_dir, write, overwrite)
    return report
