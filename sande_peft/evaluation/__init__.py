"""Evaluation: judges, generation and backdoor rates, usable on any causal LM."""

from .backdoor import BackdoorReport, answer_nll, evaluate_backdoor, triggered_prompts_for
from .generation import answer_pairs, generate_texts
from .judges import BUILTIN_JUDGES, NEGSENTIMENT, REFUSAL, SST2, KeywordJudge, TargetMatch, TargetStart, get_judge

__all__ = [
    "BackdoorReport",
    "answer_nll",
    "evaluate_backdoor",
    "triggered_prompts_for",
    "generate_texts",
    "answer_pairs",
    "BUILTIN_JUDGES",
    "NEGSENTIMENT",
    "REFUSAL",
    "SST2",
    "KeywordJudge",
    "TargetMatch",
    "TargetStart",
    "get_judge",
]
