"""sande-peft: remove backdoors from generative LLMs with trl trainers and peft adapters.

- [`OSFTTrainer`] / [`OSFTConfig`]: the trigger is known.
- [`SANDETrainer`] / [`SANDEConfig`]: only the triggered response (or part of it) is known.
- [`merge_and_export`]: merge the trained adapter and write a verified full model.
"""

import logging as _logging

# peft imports bitsandbytes, which logs on CPUs with AVX-512 bf16 that an optional kernel package is missing and falls
# back on its own code: nothing a user can act on. The filter must be in place before the first import of peft.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)

from .export import ExportReport, merge_and_export  # noqa: E402
from .osft_config import OSFTConfig  # noqa: E402
from .osft_trainer import OSFTTrainer  # noqa: E402
from .parrot import Parrot, ParrotConfig  # noqa: E402
from .sande_config import SANDEConfig  # noqa: E402
from .sande_trainer import SANDETrainer  # noqa: E402
from .scan import ScanReport, scan  # noqa: E402
from .schedule import Stage, StagePlan  # noqa: E402
from .triggers import insert_trigger  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ExportReport",
    "OSFTConfig",
    "OSFTTrainer",
    "Parrot",
    "ParrotConfig",
    "SANDEConfig",
    "SANDETrainer",
    "ScanReport",
    "Stage",
    "StagePlan",
    "insert_trigger",
    "merge_and_export",
    "scan",
    "__version__",
]


def __getattr__(name: str):
    if name == "ParrotPrompt":
        from . import parrot

        return parrot.ParrotPrompt  # warns: the old name of `Parrot`
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
