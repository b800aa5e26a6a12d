"""`sande-peft merge`: merge a trained adapter into its base and write a verified full model.

    sande-peft merge --model_name_or_path ./sande-out --output_dir ./cleaned

The base, and how it was quantized in training, come from what the trainer recorded
(`sande_peft.json`); the merged weights keep the base's dtype unless `--dtype` says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .common import DTYPES, OneLineParser, require


@dataclass
class MergeArguments:
    """Which adapter to merge, onto which base, and where the merged model goes."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "The adapter folder a trainer's `save_model()` wrote."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the merged model is written."})
    base_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The base model (default: the one the adapter records)."})
    dtype: str = field(default="auto", metadata={"help": "Merged weights' dtype; 'auto': the base's.",
                                                 "choices": list(DTYPES)})
    load_in_4bit: bool | None = field(default=None, metadata={
        "help": "Whether the adapter was trained on a 4-bit base (default: as recorded; a different value is an error)."})
    bnb_4bit_quant_type: str | None = field(default=None, metadata={"help": "4-bit type (default: as recorded)."})
    use_bnb_nested_quant: bool | None = field(default=None, metadata={"help": "Nested quantization (default: as "
                                                                                "recorded)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


def make_parser(prog: str = "sande-peft merge") -> OneLineParser:
    return OneLineParser((MergeArguments,), prog=prog, description=__doc__.splitlines()[0])


def _quantization(args: MergeArguments):
    """4-bit settings given on the command line, or None to use the recorded ones."""
    if args.load_in_4bit is None and args.bnb_4bit_quant_type is None and args.use_bnb_nested_quant is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=bool(args.load_in_4bit), bnb_4bit_quant_type=args.bnb_4bit_quant_type or "nf4",
                              bnb_4bit_use_double_quant=bool(args.use_bnb_nested_quant))


def main(args: MergeArguments) -> int:
    import torch

    from ..export import merge_and_export
    from .common import check_model_source

    require(args.model_name_or_path, "--model_name_or_path", "./sande-out")
    require(args.output_dir, "--output_dir", "./cleaned")
    check_model_source(args.model_name_or_path, "adapter")
    if args.base_model_name_or_path:
        check_model_source(args.base_model_name_or_path, "base model")
    report = merge_and_export(
        args.model_name_or_path, args.output_dir, base_model=args.base_model_name_or_path,
        quantization_config=_quantization(args), dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
        overwrite=args.overwrite,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def run(argv: list[str], prog: str = "sande-peft merge") -> int:
    (args,) = make_parser(prog).parse(argv)
    return main(args)
