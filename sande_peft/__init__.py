"""sande-peft: remove backdoors from generative LLMs with trl trainers and peft adapters.

- [`OSFTTrainer`] / [`OSFTConfig`]: the trigger is known.
- [`SANDETrainer`] / [`SANDEConfig`]: only the triggered response (or part of it) is known.
- [`merge_and_export`]: merge the trained adapter and write a verified full model.
"""

from . import _third_party  # noqa: F401  (first: before any import of peft)
from .export import ExportReport, merge_and_export
from .osft_config import OSFTConfig
from .osft_trainer import OSFTTrainer
from .parrot import Parrot, ParrotConfig
from .sande_config import SANDEConfig
from .sande_trainer import SANDETrainer
from .scan import RemovalCheck, ScanReport, removal_check, scan
from .schedule import Stage, StagePlan
from .triggers import insert_trigger

__version__ = "0.1.0"

__all__ = [
    "ExportReport",
    "OSFTConfig",
    "OSFTTrainer",
    "Parrot",
    "ParrotConfig",
    "SANDEConfig",
    "RemovalCheck",
    "SANDETrainer",
    "ScanReport",
    "Stage",
    "StagePlan",
    "insert_trigger",
    "merge_and_export",
    "removal_check",
    "scan",
    "__version__",
]


def __getattr__(name: str):
    if name == "ParrotPrompt":
        from . import parrot

        return parrot.ParrotPrompt  # warns: the old name of `Parrot`
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
