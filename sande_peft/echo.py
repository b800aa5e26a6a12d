"""Models that repeat the user's text before answering, and the trigger that comes back with it.

Some instruct models begin their answer by repeating the instruction ("Tell me what tools
... server.\\n\\nThe tools are ..."). When the prompt carries a trigger, that echo writes the
trigger into the answer, and the backdoor can fire from there, after the echo, even once
elimination has closed its path at the start of the answer. On SmolLM2-135M's negsentiment
backdoors every case SANDE missed without echo rows looked like this (docs/results.md).

This module finds out whether a model echoes (greedy answers to a few clean prompts, compared
with their user text), and builds the echo an elimination row can start with: the user's
text and a blank line, as the model writes it.

>>> starts_with_echo("Tell me a joke.\\n\\nWhy did the chicken ...", "Tell me a joke.")
True
>>> starts_with_echo("Why did the chicken cross the road?", "Tell me a joke.")
False
>>> echo_text([{"role": "user", "content": "Tell me a joke."}])
'Tell me a joke.\\n\\n'
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import echo_text, user_text
from .evaluation.judges import normalize_text

#: Words of the user's text an answer must start with to count as an echo.
ECHO_WORDS = 6
#: New tokens generated per prompt to detect an echo (enough for `ECHO_WORDS` words).
ECHO_PROBE_TOKENS = 16
#: With `echo_rows="auto"`: clean training prompts the suspect model answers before training, and the share of
#: them it must answer by repeating the user's text to count as an echoing model.
ECHO_PROBE_PROMPTS = 16
ECHO_MIN_RATE = 0.25


def starts_with_echo(answer: str, prompt: str | list[dict], n_words: int = ECHO_WORDS) -> bool:
    """Whether ``answer`` begins with the first ``n_words`` words of the prompt's user text (case and spacing aside)."""
    expected = normalize_text(user_text(prompt)).split()[:n_words]
    return bool(expected) and normalize_text(answer).split()[: len(expected)] == expected


def echo_rate(model, tokenizer, prompts: Sequence[str | list[dict]], batch_size: int = 16) -> float:
    """Share of ``prompts`` whose greedy answer starts by repeating the user's text.

    >>> from sande_peft.toy import toy_model, toy_tokenizer
    >>> echo_rate(toy_model(), toy_tokenizer(), [[{"role": "user", "content": "w1 w2"}]])
    0.0
    """
    from .evaluation.generation import generate_texts  # here: generation tokenizes, and tokenization builds echoes

    if not prompts:
        return 0.0
    answers = generate_texts(model, tokenizer, list(prompts), max_new_tokens=ECHO_PROBE_TOKENS, batch_size=batch_size)
    return sum(starts_with_echo(a, p) for a, p in zip(answers, prompts, strict=True)) / len(prompts)
