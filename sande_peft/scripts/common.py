"""What every `sande-peft` subcommand shares: one parser dialect and one way to load a model.

Every subcommand is a dataclass parsed by trl's `TrlParser`, as `trl sft` is: each field is a
flag (``--model_name_or_path`` or ``--model-name-or-path``), ``--config recipe.yaml`` sets
defaults, and the command line overrides them. Bad input raises [`CommandLineError`], which
the command prints as one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from trl import TrlParser

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CommandLineError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class OneLineParser(TrlParser):
    """`TrlParser` whose errors are one line naming the problem and the fix, raised instead of printed."""

    def error(self, message: str):
        raise CommandLineError(f"{message} (see `{self.prog} --help`)")

    def parse(self, argv: list[str]):
        import yaml

        if "--config" in argv:
            index = argv.index("--config")
            if index + 1 >= len(argv) or not os.path.isfile(argv[index + 1]):
                missing = argv[index + 1] if index + 1 < len(argv) else ""
                raise CommandLineError(f"--config {missing!r}: no such recipe file; pass a YAML file's path.")
        try:
            return self.parse_args_and_config(args=argv)
        except ValueError as error:
            if "not used by the HfArgumentParser" not in str(error):
                raise
            unknown = [a for a in argv if a.startswith("--") and a not in self._option_string_actions]
            raise CommandLineError(f"Unknown flag(s) {', '.join(unknown) or str(error)}: see `{self.prog} --help` for the "
                                   "flags this command takes.") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise CommandLineError(f"The --config file is not valid YAML{at}: {getattr(error, 'problem', error)}.") from None


@dataclass
class ModelLoading:
    """How to load a model: its dtype, 4-bit quantization, and code trust (as trl's `ModelConfig` names them)."""

    dtype: str = field(default="auto", metadata={"help": "Weights' dtype; 'auto' keeps the checkpoint's.",
                                                 "choices": list(DTYPES)})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the (base) model in 4-bit NF4 (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type.",
                                                              "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested (double) 4-bit quantization."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Trust the model's own code."})

    def torch_dtype(self):
        import torch

        return self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)

    def quantization_config(self):
        if not self.load_in_4bit:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if self.dtype in ("auto", "float32") else getattr(torch, self.dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.use_bnb_nested_quant, bnb_4bit_compute_dtype=compute)


def require(value, flag: str, example: str) -> None:
    """A required setting: a clear error naming the flag when it is missing."""
    if value is None or value == "" or value == []:
        raise CommandLineError(f"Set `{flag}`, e.g. `{flag} {example}` (or `{flag.lstrip('-')}:` in a --config recipe).")


def check_model_source(path: str, what: str = "model") -> None:
    """A model source that is neither a folder nor shaped like a hub id (``name`` or ``org/name``) fails here,
    with its name, not deep inside transformers."""
    if os.path.exists(path):
        return
    if path.startswith(".") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise FileNotFoundError(f"No {what} at {path}: pass a model folder, or a hub id such as `org/name`.")


def load_model_and_tokenizer(path: str, loading: ModelLoading, base: str | None = None):
    """``(model, tokenizer, parrot)`` for a model folder or hub id, or an adapter folder on its base."""
    from transformers import AutoTokenizer

    from ..loading import is_adapter_folder, load_model

    check_model_source(path)
    if base:
        check_model_source(base, "base model")
    model, parrot = load_model(path, base_model=base, quantization_config=loading.quantization_config(),
                               dtype=loading.torch_dtype(), trust_remote_code=loading.trust_remote_code)
    source = path if not is_adapter_folder(path) or os.path.isfile(os.path.join(path, "tokenizer_config.json")) else (
        base or model.peft_config["default"].base_model_name_or_path)
    return model, AutoTokenizer.from_pretrained(source, trust_remote_code=loading.trust_remote_code), parrot
