"""`sande-peft demo`: the offline demo on SmolLM2-135M-Instruct (implant, SANDE, measure, export)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import OneLineParser


@dataclass
class DemoArguments:
    output_dir: str = field(default="sande-demo", metadata={"help": "Where the demo writes its models and report."})
    quick: bool = field(default=False, metadata={"help": "A reduced run (a few minutes; for tests)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of the converted SmolLM2 model."})


def make_parser(prog: str = "sande-peft demo") -> OneLineParser:
    return OneLineParser((DemoArguments,), prog=prog, description=__doc__.splitlines()[0])


def main(args: DemoArguments) -> int:
    from ..demo import DemoSettings, run_demo

    run_demo(DemoSettings.quick() if args.quick else DemoSettings(), output_dir=args.output_dir, cache_dir=args.cache_dir)
    return 0


def run(argv: list[str], prog: str = "sande-peft demo") -> int:
    (args,) = make_parser(prog).parse(argv)
    return main(args)
