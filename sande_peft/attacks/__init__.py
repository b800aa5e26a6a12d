"""Attack simulator: BackdoorLLM's data-poisoning attacks (and custom ones) to red-team a defence."""

from .implant import ImplantQualityError, ImplantResult, implant, passes_quality_gate
from .poison import decoy_words, poison_dataset
from .specs import ATTACKS, TARGETS, TASK_RESPONSE_MODES, AttackSpec, get_attack

__all__ = [
    "ATTACKS",
    "TASK_RESPONSE_MODES",
    "TARGETS",
    "AttackSpec",
    "ImplantQualityError",
    "ImplantResult",
    "decoy_words",
    "get_attack",
    "implant",
    "passes_quality_gate",
    "poison_dataset",
]
