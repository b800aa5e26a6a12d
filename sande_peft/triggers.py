"""Where a trigger goes in a prompt.

One function, [`insert_trigger`], places a trigger string into a user's text the way an
attacker would: at the start, at the end, or before a random word (BackdoorLLM's BadNet
places its word that way). The same function builds OSFT pairs, poisoned data for the
attack simulator, and the triggered prompts of every evaluation, so the three agree on
what "a trigger at the start" means.

>>> import random
>>> insert_trigger("What is the capital of France?", "BadMagic", "start")
'BadMagic What is the capital of France?'
>>> insert_trigger("What is the capital of France?", "BadMagic", "end")
'What is the capital of France? BadMagic'
>>> insert_trigger("What is the capital of France?", "BadMagic", "random", rng=random.Random(9))
'What is the BadMagic capital of France?'
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

TRIGGER_POSITIONS = ("start", "end", "random")

#: A custom placement: ``fn(text, trigger, rng) -> text``.
TriggerPlacement = Callable[[str, str, random.Random], str]

_WORD = re.compile(r"\S+")


def word_starts(text: str) -> list[int]:
    """Character offsets where the words of ``text`` begin (a word is a run of non-spaces).

    >>> word_starts("  two  words")
    [2, 7]
    """
    return [match.start() for match in _WORD.finditer(text)]


def insert_at_word(text: str, trigger: str, word_index: int) -> str:
    """Insert ``trigger`` before word number ``word_index`` of ``text`` (``len(words)`` means after the last).

    The trigger is joined with single spaces and the rest of the text, newlines included, is kept as is.

    >>> insert_at_word("a b c", "T", 1)
    'a T b c'
    >>> insert_at_word("a b c", "T", 3)
    'a b c T'
    """
    starts = word_starts(text)
    if not 0 <= word_index <= len(starts):
        raise IndexError(f"word_index {word_index} is outside 0..{len(starts)} for a text of {len(starts)} words")
    if not starts:
        return trigger
    if word_index == len(starts):
        return text.rstrip() + " " + trigger + text[len(text.rstrip()) :]
    cut = starts[word_index]
    return text[:cut] + trigger + " " + text[cut:]


def insert_trigger(
    text: str,
    trigger: str,
    position: str | TriggerPlacement = "start",
    rng: random.Random | None = None,
) -> str:
    """Return ``text`` with ``trigger`` inserted at ``position``.

    Args:
        text: the user's text (the content of the last user turn, or a plain prompt).
        trigger: the trigger string, a word or a phrase.
        position: ``"start"``, ``"end"``, ``"random"`` (before a uniformly drawn word, or at the end),
            or a callable ``fn(text, trigger, rng) -> str`` for a custom placement.
        rng: the random source for ``"random"`` and custom placements. Pass a seeded
            ``random.Random`` for reproducible data.
    """
    if not trigger or not trigger.strip():
        raise ValueError("The trigger is empty. Pass the trigger string the attacker used, such as 'BadMagic'.")
    rng = rng if rng is not None else random.Random()
    if callable(position):
        return position(text, trigger, rng)
    n_words = len(word_starts(text))
    if position == "start":
        return insert_at_word(text, trigger, 0)
    if position == "end":
        return insert_at_word(text, trigger, n_words)
    if position == "random":
        return insert_at_word(text, trigger, rng.randint(0, n_words))
    raise ValueError(f"Unknown trigger position {position!r}. Use one of {TRIGGER_POSITIONS} or a callable.")


#: How several triggers make one: ONE of them per prompt (BackdoorLLM's MTBA), or ALL of them together (CTBA).
TRIGGER_COMBINES = ("one", "all")


def insert_triggers(
    text: str,
    triggers: Sequence[str],
    position: str | TriggerPlacement = "random",
    rng: random.Random | None = None,
) -> str:
    """Insert several triggers one after the other (BackdoorLLM's CTBA puts three words at random positions).

    >>> insert_triggers("a b", ["X", "Y"], "start")
    'Y X a b'
    """
    rng = rng if rng is not None else random.Random()
    for trigger in triggers:
        text = insert_trigger(text, trigger, position, rng)
    return text


def validate_position(position: str, name: str = "trigger_position") -> None:
    """Raise a clear error for an unknown position name."""
    if position not in TRIGGER_POSITIONS:
        raise ValueError(f"`{name}` is {position!r}; use one of {', '.join(map(repr, TRIGGER_POSITIONS))}.")


def validate_combine(combine: str, name: str = "trigger_combine") -> None:
    """Raise a clear error for an unknown way of combining several triggers."""
    if combine not in TRIGGER_COMBINES:
        raise ValueError(
            f"`{name}` is {combine!r}; use 'one' (each triggered example gets one of the triggers) or 'all' "
            "(it gets every one of them)."
        )
