"""Attack simulator: BackdoorLLM's data-poisoning attacks (and custom ones) to red-team a defence."""

from .implant import ImplantQualityError, ImplantResult, implant, passes_quality_gate
from .poison import decoy_words, poison_dataset
from .specs import ATTACKS, RESPONSE_MODES, TARGETS, AttackSpec, get_attack

__all__ = [
    "ATTACKS",
    "RESPONSE_MODES",
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
