"""Evaluation: judges, generation, backdoor rates and utility, usable on any causal LM."""

from .backdoor import BackdoorReport, answer_budgets, answer_nll, evaluate_backdoor, triggered_prompts_for
from .generation import Sampling, answer_pairs, generate_texts, sample_texts
from .stress import refinetune
from .judges import BUILTIN_JUDGES, NEGSENTIMENT, REFUSAL, SST2, KeywordJudge, TargetMatch, TargetStart, get_judge
from .utility import DriftReport, ReferenceAnswers, defence_score, model_drift, reference_answers
from .variants import trigger_variants

__all__ = [
    "BackdoorReport",
    "DriftReport",
    "ReferenceAnswers",
    "Sampling",
    "answer_budgets",
    "answer_nll",
    "answer_pairs",
    "defence_score",
    "evaluate_backdoor",
    "generate_texts",
    "model_drift",
    "reference_answers",
    "refinetune",
    "sample_texts",
    "trigger_variants",
    "triggered_prompts_for",
    "BUILTIN_JUDGES",
    "NEGSENTIMENT",
    "REFUSAL",
    "SST2",
    "KeywordJudge",
    "TargetMatch",
    "TargetStart",
    "get_judge",
]
