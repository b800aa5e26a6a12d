"""Models that repeat the user's text before answering, and the trigger that comes back with it.

Some instruct models begin their answer by repeating the instruction ("Tell me what tools
... server.\\n\\nThe tools are ..."). When the prompt carries a trigger, that echo writes the
trigger into the answer, and the backdoor can fire from there, after the echo, even once
elimination has closed its path at the start of the answer. On SmolLM2-135M's negsentiment
backdoors every case SANDE missed without echo rows looked like this (docs/results.md).

This module finds out whether a model echoes before it answers (greedy answers to a few clean
prompts, compared with their user text), and builds the echo an elimination row can start
with: the user's text and a blank line, as the model writes it. A model whose answer IS the
user's text repeated (a copying task) does not count: it writes no answer after the echo for a
backdoor to take over, and rows that put a second answer after an echo would only teach it
something it never does.

>>> echoes_then_answers("Tell me a joke.\\n\\nWhy did the chicken ...", "Tell me a joke.")
True
>>> echoes_then_answers("Why did the chicken cross the road?", "Tell me a joke.")
False
>>> echoes_then_answers("Tell me a joke.", "Tell me a joke.")  # the whole answer is the echo
False
>>> echo_text([{"role": "user", "content": "Tell me a joke."}])
'Tell me a joke.\\n\\n'
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import echo_text, user_text
from .evaluation.judges import normalize_text

#: New tokens generated per prompt to detect an echo, beyond the user's text: room for the answer after it.
ECHO_PROBE_TOKENS = 16
#: With `echo_rows="auto"`: clean training prompts the suspect model answers before training, and the share of
#: them it must answer by repeating the user's text to count as an echoing model.
ECHO_PROBE_PROMPTS = 16
ECHO_MIN_RATE = 0.25


def echoes_then_answers(answer: str, prompt: str | list[dict]) -> bool:
    """Whether ``answer`` repeats the prompt's user text, then goes on (case and spacing aside)."""
    expected = normalize_text(user_text(prompt)).split()
    words = normalize_text(answer).split()
    return bool(expected) and words[: len(expected)] == expected and len(words) > len(expected)


def echo_rate(model, tokenizer, prompts: Sequence[str | list[dict]], batch_size: int = 16) -> float:
    """Share of ``prompts`` whose greedy answer repeats the user's text, then answers.

    >>> from sande_peft.toy import toy_model, toy_tokenizer
    >>> echo_rate(toy_model(), toy_tokenizer(), [[{"role": "user", "content": "w1 w2"}]])
    0.0
    """
    from .evaluation.generation import generate_texts  # here: generation tokenizes, and tokenization builds echoes

    if not prompts:
        return 0.0
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    budgets = [len(tok(user_text(p), add_special_tokens=False)["input_ids"]) + ECHO_PROBE_TOKENS for p in prompts]
    answers = generate_texts(model, tokenizer, list(prompts), max_new_tokens=budgets, batch_size=batch_size)
    return sum(echoes_then_answers(a, p) for a, p in zip(answers, prompts, strict=True)) / len(prompts)
