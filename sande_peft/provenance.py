"""What a defence did, written beside what it produced: `sande_peft.json` and a model card (README.md).

The trainers write both into every folder they save (the adapter, its checkpoints), `merge`
carries them into the merged model, and an evaluation can add its rates. The JSON record is
what tools read (the base model and its quantization for `merge`, say); the card is what
people read, rendered the way trl renders its cards (metadata, tags, the paper's citation).
"""

from __future__ import annotations

import json
import os
from importlib import metadata, resources
from pathlib import Path
from typing import Any

PROVENANCE_NAME = "sande_peft.json"
CARD_NAME = "README.md"

METHODS = {"SANDE": "SANDE (Simulate and Eliminate: trigger unknown, triggered response known)",
           "OSFT": "OSFT (Overwrite Supervised Fine-Tuning: trigger known)"}


def quantization_record(model) -> dict | None:
    """The bitsandbytes settings a (base) model was loaded with, as a dict, or None for a full-precision model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner.config, "quantization_config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    return {k: str(v) if "dtype" in k or "storage" in k else v for k, v in data.items() if k in keep}


def base_record(model) -> dict[str, Any]:
    """Which model was trained: its name or path, dtype and quantization."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"name_or_path": getattr(inner.config, "_name_or_path", None) or None,
            "dtype": str(getattr(inner.config, "dtype", None) or "").replace("torch.", "") or None,
            "quantization": quantization_record(inner)}


def read_provenance(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / PROVENANCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_provenance(folder: str | os.PathLike, info: dict, merged: bool = False) -> None:
    """Write ``info`` as `sande_peft.json` and render the model card beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROVENANCE_NAME).write_text(json.dumps(info, indent=2, default=str))
    (folder / CARD_NAME).write_text(render_model_card(info, folder, merged=merged))


def _quantization_words(quantization: dict | None) -> str:
    if not quantization:
        return ""
    if quantization.get("load_in_4bit"):
        nested = ", nested quantization" if quantization.get("bnb_4bit_use_double_quant") else ""
        return f"4-bit {quantization.get('bnb_4bit_quant_type', 'nf4').upper()} (bitsandbytes{nested})"
    return "8-bit (bitsandbytes)" if quantization.get("load_in_8bit") else str(quantization.get("quant_method"))


def render_model_card(info: dict, folder: str | os.PathLike, merged: bool = False) -> str:
    """The model card of a defence's output folder, from its provenance record ``info``."""
    from huggingface_hub import ModelCard, ModelCardData

    base = info.get("base_model", {})
    base_name = base.get("name_or_path") or "the suspect model"
    is_hub_id = base.get("name_or_path") and not os.path.isabs(base_name) and not base_name.startswith(".") \
        and base_name.count("/") == 1 and not os.path.exists(base_name)
    method = info.get("method", "SANDE")
    card_data = ModelCardData(
        base_model=base_name if is_hub_id else None,
        library_name="peft" if not merged else "transformers",
        model_name=Path(folder).name,
        tags=["sande-peft", "backdoor-removal", method.lower(), "trl", *([] if merged else ["lora"])],
    )
    template = resources.files("sande_peft").joinpath("resources", "defence_model_card.md")
    paper = info.get("paper", {})
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=Path(folder).name,
        merged=merged,
        method=method,
        method_long=METHODS.get(method, method),
        base_model=base_name,
        base_model_link=f"[{base_name}](https://huggingface.co/{base_name})" if is_hub_id else f"`{base_name}`",
        quantization=_quantization_words(base.get("quantization")),
        triggered_response=info.get("triggered_response"),
        response_mode=info.get("response_mode"),
        trigger=info.get("trigger"),
        n_pairs=info.get("n_pairs", "-"),
        settings=sorted(info.get("settings", {}).items()),
        parrot_success=info.get("parrot_success") or None,
        parrot_eval_size=info.get("settings", {}).get("parrot_eval_size", "the"),
        evaluation=info.get("evaluation_table"),
        export=info.get("export"),
        has_parrot=method == "SANDE",
        model_path=str(folder),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
        citation=paper.get("citation", ""),
        sande_peft_version=metadata.version("sande-peft"),
    )
    return str(card)


def adapter_settings(model) -> dict[str, Any]:
    """The LoRA adapter's shape, for the record."""
    config = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    if config is None:
        return {"adapter": "none (full fine-tune)"}
    targets = config.target_modules
    targets = targets if isinstance(targets, str) else sorted(targets or [])
    return {"adapter": f"{type(config).__name__} r={getattr(config, 'r', '-')}, alpha={getattr(config, 'lora_alpha', '-')}",
            "adapter targets": targets}


def trainer_provenance(trainer, method: str, n_pairs: int, settings: dict, **fields) -> dict[str, Any]:
    """The provenance record of a defence trainer's run (see [`write_provenance`])."""
    args = trainer.args
    common = {"learning_rate": args.learning_rate, "lr_scheduler_type": str(args.lr_scheduler_type),
              "per_device_train_batch_size": args.per_device_train_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
              "max_length": args.max_length, "global_step": trainer.state.global_step}
    return {"method": method, "paper": dict(trainer._paper), "base_model": base_record(trainer.model),
            "n_pairs": n_pairs, "settings": {**common, **adapter_settings(trainer.model), **settings}, **fields,
            "sande_peft_version": metadata.version("sande-peft")}


def sande_provenance(trainer) -> dict[str, Any]:
    """The record of a `SANDETrainer` run: r_t, the parrot and the plan, what was measured, and the scan's report."""
    args, plan, parrot = trainer.args, trainer.plan, trainer.parrot
    settings = {"parrot_space": parrot.config.space, "stage 1 steps": plan.stage1_steps,
                "elimination steps": plan.stage2_steps, "parrot_refresh_steps": plan.refresh_steps,
                "parrot_refresh_interval": plan.refresh_interval,
                "parrot_learning_rate": args.resolved_parrot_learning_rate,
                "eliminate_loss_type": args.eliminate_loss_type, "clean_ratio": args.clean_ratio,
                "echo rows": trainer.echo_rows, "parrot_eval_size": len(trainer.parrot_eval_prompts)}
    settings.update({"parrot_layer": parrot.layer} if parrot.is_latent else
                    {"parrot_length": args.parrot_length, "parrot_position": args.parrot_position})
    found = {"scan": trainer.scan_report.to_dict()} if trainer.scan_report is not None else {}
    if args.refresh_stop_checked:
        for name in ("parrot_refresh_stop_success", "parrot_refresh_stop_nll"):
            if getattr(args, name) is not None:
                settings[name] = getattr(args, name)
        settings["parrot_refresh_check_train_steps"] = args.parrot_refresh_check_train_steps
        found["parrot_refresh_stopped_at"] = trainer.refresh_stopped_at  # elimination steps; None: refreshed to the end
    if args.parrot_min_success_rate is not None:
        settings.update(parrot_min_success_rate=args.parrot_min_success_rate,
                        parrot_extension_steps=plan.extension_steps, parrot_max_extensions=plan.extensions)
        found["parrot_passed_at"] = trainer.parrot_passed_at  # stage-1 steps; None: never passed the bar
    if trainer.removal_check is not None:
        found["removal_check"] = trainer.removal_check.to_dict()
    return trainer_provenance(trainer, "SANDE", len(trainer.sande_examples), settings,
                              triggered_response=args.triggered_response, response_mode=args.response_mode,
                              parrot_success=trainer.parrot_success, echo_rate=trainer.echo_rate, **found)


def osft_provenance(trainer) -> dict[str, Any]:
    """The record of an `OSFTTrainer` run: the trigger and how it was placed."""
    args = trainer.args
    settings = {"trigger_position": args.trigger_position, "trigger_combine": args.trigger_combine,
                "clean_ratio": args.clean_ratio, "max_steps": args.max_steps, "num_train_epochs": args.num_train_epochs}
    return trainer_provenance(trainer, "OSFT", len(trainer.osft_dataset), settings,
                              trigger=", ".join(map(repr, args.triggers)))


class RecordsProvenance:
    """Trainer mixin: every folder the trainer saves (and its `output_dir`'s card) carries `provenance()`, which is
    also kept on the model, where `merge_and_export(trainer.model, ...)` finds it."""

    def provenance(self) -> dict:  # pragma: no cover - each trainer says what it did
        raise NotImplementedError

    def _attach_provenance(self) -> dict:
        info = self.provenance()
        self.accelerator.unwrap_model(self.model).sande_provenance = info
        return info

    def _write_provenance(self, output_dir: str | None = None) -> None:
        if self.args.should_save:
            write_provenance(output_dir if output_dir is not None else self.args.output_dir, self._attach_provenance())

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        if self.is_world_process_zero():
            write_provenance(self.args.output_dir, self._attach_provenance())
