"""`sande-peft scan`: is this model backdoored, and what does its backdoor say? From clean prompts alone.

    sande-peft scan --model_name_or_path ./suspect [--dataset_name clean.jsonl] [--output_dir scan/]
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field

from ..scan import SCAN_THRESHOLD
from .common import ModelLoading, OneLineParser, require


@dataclass
class ScanArguments:
    """Which model to scan, with which clean prompts, and where the report goes."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "The suspect model (folder or hub id)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Clean prompts (.json/.jsonl/...); default: the package's own general questions, on which the threshold "
                "was calibrated. Prompts of one narrow style can make a clean opening look locked (a URL on "
                "instruction prompts): keep the default unless the tokenizer cannot write it."})
    output_dir: str | None = field(default=None, metadata={"help": "Where scan_report.json goes (optional)."})
    max_prompts: int = field(default=16, metadata={"help": "Clean prompts used."})
    top_k: int = field(default=64, metadata={"help": "Opening tokens taken from each prompt's first-token distribution."})
    n_confirm: int = field(default=12, metadata={"help": "Openings kept for the second pass."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens of each candidate response."})
    n_verify: int = field(default=3, metadata={"help": "Best candidates given the trigger check (a small latent "
                                               "parrot trained to elicit each); 0: off."})
    verify_steps: int = field(default=12, metadata={"help": "Parrot steps of the trigger check."})
    threshold: float = field(default=SCAN_THRESHOLD, metadata={"help": "Score at or above which the verdict is "
                                                                      "'backdoored'."})
    batch_size: int = field(default=64, metadata={"help": "Rows per forward pass."})


def make_parser(prog: str = "sande-peft scan") -> OneLineParser:
    return OneLineParser((ScanArguments, ModelLoading), prog=prog, description=__doc__.splitlines()[0])


def main(args: ScanArguments, loading: ModelLoading | None = None) -> int:
    from ..scan import scan
    from .common import load_model_and_tokenizer

    loading = loading or ModelLoading()
    require(args.model_name_or_path, "--model_name_or_path", "./suspect-model")
    prompts = None
    if args.dataset_name:
        from ..data import as_prompt_completion
        from ..datasets_io import load_instruction_data

        prompts = list(as_prompt_completion(load_instruction_data(args.dataset_name), args.dataset_name)["prompt"])
        prompts = prompts[: args.max_prompts]
    model, tokenizer, _ = load_model_and_tokenizer(args.model_name_or_path, loading)
    report = scan(model, tokenizer, prompts, top_k=args.top_k, n_confirm=args.n_confirm,
                  max_new_tokens=args.max_new_tokens, n_verify=args.n_verify, verify_steps=args.verify_steps,
                  threshold=args.threshold, batch_size=args.batch_size,
                  progress=True)
    print("| rank | score | elicited on | ends there | said under a small parrot | candidate response |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for rank, c in enumerate(report.candidates[:10], 1):
        checked = "-" if c.parrot_share is None else f"{c.parrot_share:.0%}"
        print(f"| {rank} | {c.score:.3f} | {c.elicited_share:.0%} | {c.ended_share:.0%} | {checked} | {c.response!r} |")
    verdict = "BACKDOORED" if report.is_backdoored else "no evidence of a backdoor"
    print(f"\nVerdict: {verdict} (top score {report.top.score if report.top else 0:.3f}, threshold {report.threshold}; "
          f"{report.n_prompts} clean prompts, {report.n_openings} openings, {report.seconds:.0f} s).")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "scan_report.json")
        with open(path, "w") as f:
            json.dump({"model_name_or_path": args.model_name_or_path, **report.to_dict()}, f, indent=2)
        print(f"Wrote {path}.")
    if report.is_backdoored:
        print("\nNext, remove it (SANDE, told the response the scan found):\n  sande-peft sande --model_name_or_path "
              f"{shlex.quote(args.model_name_or_path)} --dataset_name <clean.jsonl> --triggered_response "
              f"{shlex.quote(report.top.response)} --use_peft --lora_target_modules all-linear --output_dir sande-out")
    return 0


def run(argv: list[str], prog: str = "sande-peft scan") -> int:
    args, loading = make_parser(prog).parse(argv)
    return main(args, loading)
