"""SANDE's stage plan: which optimizer step trains what, and with which data.

A SANDE run is one `Trainer.train()` call whose optimizer steps belong to two stages:

- **simulate** (stage 1): only the parrot trains, the model is frozen;
- **eliminate** (stage 2): only the model (its adapter) trains, the parrot is frozen. With
  ``refresh_steps``, elimination steps are preceded by that many parrot steps against the
  model as it now is (every one of them, or every ``refresh_interval``-th), so the parrot keeps
  chasing what is left of the backdoor.

[`StagePlan`] lays the steps out ([`Segment`]s), gives each parameter group its learning-rate
factor per step, decides ahead of training which example fills every slot of every step
([`StagePlan.rows`]), and checks that a checkpoint was trained with the same plan. A fixed plan
makes the stage of each step known in advance, lets distributed ranks agree, and makes a
resumed run replay the same data. It needs no model:

>>> plan = StagePlan(stage1_steps=2, stage2_steps=2, refresh_steps=1)
>>> [(s.stage.value, s.start, s.steps, s.refresh) for s in plan.segments]
[('simulate', 0, 2, False), ('simulate', 2, 1, True), ('eliminate', 3, 1, False), ('simulate', 4, 1, True), ('eliminate', 5, 1, False)]
>>> plan.total_steps, plan.stage_at(3), plan.eliminate_index(5)
(6, <Stage.ELIMINATE: 'eliminate'>, 1)
>>> plan.rows(n_examples=1, global_batch_size=2, clean_ratio=0.5)[:6]
[Row(stage=<Stage.SIMULATE: 'simulate'>, index=0, parrot=True), Row(stage=<Stage.SIMULATE: 'simulate'>, index=0, parrot=True), Row(stage=<Stage.SIMULATE: 'simulate'>, index=0, parrot=True), Row(stage=<Stage.SIMULATE: 'simulate'>, index=0, parrot=True), Row(stage=<Stage.SIMULATE: 'simulate'>, index=0, parrot=True), Row(stage=<Stage.SIMULATE: 'simulate'>, index=0, parrot=True)]
"""

from __future__ import annotations

import bisect
import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .data import mix_counts


class Stage(str, enum.Enum):
    """The stage of an optimizer step. Logged as ``stage`` 1 (simulate) or 2 (eliminate)."""

    SIMULATE = "simulate"
    ELIMINATE = "eliminate"

    @property
    def number(self) -> int:
        return 1 if self is Stage.SIMULATE else 2


class Row(NamedTuple):
    """One slot of a step: example ``index`` of the training pairs, carrying the parrot or not.

    Simulate rows always carry it (onto r_t); eliminate rows carry it (onto the clean answer)
    or not (a plain clean pair, mixed in by ``clean_ratio``).
    """

    stage: Stage
    index: int
    parrot: bool


@dataclass(frozen=True)
class Segment:
    """A run of consecutive optimizer steps of one stage."""

    stage: Stage
    start: int  # first optimizer step, 0-based
    steps: int
    refresh: bool = False  # parrot steps between elimination steps, against the model as elimination left it
    measure: bool = True  # the parrot is measured when the segment ends (not after every refresh)
    extension: bool = False  # more stage-1 steps, taken only while the parrot is below its success bar

    @property
    def end(self) -> int:
        return self.start + self.steps


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


@dataclass
class StagePlan:
    """Stage 1 for ``stage1_steps``, then ``stage2_steps`` elimination steps; ``refresh_steps`` parrot steps come
    before the first elimination step and then before every ``refresh_interval``-th.

    ``extensions`` stage-1 segments of ``extension_steps`` each follow the first one: the trainer takes them only
    while the parrot is below its success bar, and skips the rest at no cost.

    >>> [s.steps for s in StagePlan(0, 4, refresh_steps=1, refresh_interval=2).segments]  # refresh, 2 x eliminate
    [1, 2, 1, 2]
    >>> [(s.steps, s.extension) for s in StagePlan(3, 1, extension_steps=2, extensions=2).segments]
    [(3, False), (2, True), (2, True), (1, False)]
    """

    stage1_steps: int
    stage2_steps: int
    refresh_steps: int = 0
    refresh_interval: int = 1
    extension_steps: int = 0
    extensions: int = 0
    segments: list[Segment] = field(init=False, repr=False)

    def __post_init__(self):
        if self.stage1_steps < 0 or self.stage2_steps < 1:
            raise ValueError(f"A plan needs stage-1 steps >= 0 and stage-2 steps >= 1, got {self.stage1_steps} and "
                             f"{self.stage2_steps}.")
        if self.refresh_steps < 0:
            raise ValueError(f"`refresh_steps` is {self.refresh_steps}; use 0 (a fixed parrot) or more.")
        if self.refresh_interval < 1:
            raise ValueError(f"`refresh_interval` is {self.refresh_interval}; use 1 (before every elimination step) or more.")
        if self.extension_steps < 0 or self.extensions < 0 or (self.extensions and not self.extension_steps):
            raise ValueError(f"Stage-1 extensions need `extension_steps` >= 1 when `extensions` > 0, got "
                             f"{self.extension_steps} and {self.extensions}.")
        segments: list[Segment] = []
        step = 0

        def add(stage: Stage, steps: int, **kwargs) -> None:
            nonlocal step
            segments.append(Segment(stage, step, steps, **kwargs))
            step += steps

        if self.stage1_steps:
            add(Stage.SIMULATE, self.stage1_steps)
        for _ in range(self.extensions):
            add(Stage.SIMULATE, self.extension_steps, extension=True)
        if self.refresh_steps == 0:
            add(Stage.ELIMINATE, self.stage2_steps)
        else:
            for first in range(0, self.stage2_steps, self.refresh_interval):
                add(Stage.SIMULATE, self.refresh_steps, refresh=True, measure=False)
                steps = min(self.refresh_interval, self.stage2_steps - first)
                add(Stage.ELIMINATE, steps, measure=first + steps == self.stage2_steps)
        self.segments = segments
        self._starts = [s.start for s in segments]
        # For every step, how many elimination steps came before it: stage 2's own schedule runs over those alone.
        self._eliminated_before: list[int] = []
        done = 0
        for seg in segments:
            for _ in range(seg.steps):
                self._eliminated_before.append(done)
                done += seg.stage is Stage.ELIMINATE

    @classmethod
    def for_run(
        cls,
        n_examples: int,
        global_batch_size: int,
        clean_ratio: float,
        parrot_max_steps: int,
        parrot_num_train_epochs: float,
        max_steps: int,
        num_train_epochs: float,
        eliminate_max_steps: int | None,
        refresh_steps: int,
        refresh_interval: int = 1,
        extension_steps: int = 0,
        extensions: int = 0,
    ) -> StagePlan:
        """The plan of a run over ``n_examples`` clean pairs, with SANDEConfig's step settings.

        Stage 2 runs ``num_train_epochs`` passes over its pairs (each clean pair carrying the
        parrot, and the clean pairs mixed in by ``clean_ratio``), capped at ``eliminate_max_steps``;
        a positive ``max_steps`` overrides both, as in trl.

        >>> StagePlan.for_run(200, 8, 0.5, -1, 2.0, -1, 5.0, 100, 2).stage2_steps  # 5 x 400 / 8 = 250, capped
        100
        """
        stage1 = steps_for(n_examples, parrot_num_train_epochs, parrot_max_steps, global_batch_size)
        n_stage2 = sum(mix_counts(n_examples, clean_ratio))
        stage2 = steps_for(n_stage2, num_train_epochs, max_steps, global_batch_size)
        if max_steps <= 0 and eliminate_max_steps is not None:
            stage2 = min(stage2, eliminate_max_steps)
        return cls(stage1, stage2, refresh_steps, refresh_interval, extension_steps, extensions)

    @property
    def total_steps(self) -> int:
        return self.segments[-1].end

    @property
    def stage1_end(self) -> int:
        """The first optimizer step after stage 1, its extensions included."""
        return self.stage1_steps + self.extensions * self.extension_steps

    def segment_at(self, step: int) -> Segment:
        """The segment of optimizer step ``step`` (0-based)."""
        return self.segments[max(0, bisect.bisect_right(self._starts, step) - 1)]

    def stage_at(self, step: int) -> Stage:
        return self.segment_at(step).stage

    def eliminate_index(self, step: int) -> int:
        """How many elimination steps come before optimizer step ``step``."""
        return self._eliminated_before[min(step, len(self._eliminated_before) - 1)]

    def lr_lambdas(self, stage2_factor: Callable[[int], float], n_model_groups: int) -> list[Callable[[int], float]]:
        """Learning-rate factors for `LambdaLR`: the model's groups first, the parrot's group last.

        The parrot learns at its constant rate in parrot steps only; the model follows
        ``stage2_factor`` (an SFT schedule over the elimination steps alone) in elimination steps only.

        >>> plan = StagePlan(1, 2, refresh_steps=1)
        >>> model, parrot = plan.lr_lambdas(lambda k: 1.0 / (k + 1), n_model_groups=1)
        >>> [model(s) for s in range(5)], [parrot(s) for s in range(5)]
        ([0.0, 0.0, 1.0, 0.0, 0.5], [1.0, 1.0, 0.0, 1.0, 0.0])
        """

        def model_factor(step: int) -> float:
            return stage2_factor(self.eliminate_index(step)) if self.stage_at(step) is Stage.ELIMINATE else 0.0

        def parrot_factor(step: int) -> float:
            return 1.0 if self.stage_at(step) is Stage.SIMULATE else 0.0

        return [model_factor] * n_model_groups + [parrot_factor]

    def rows(self, n_examples: int, global_batch_size: int, clean_ratio: float, seed: int = 0) -> list[Row]:
        """Which row fills each slot of each step, segment after segment.

        Each step takes ``global_batch_size`` consecutive slots (per-device batch x processes x
        gradient accumulation), so every step belongs to exactly one stage. Stage 2's pool pairs
        parrot-carrying rows with plain clean rows as ``clean_ratio`` says (see `mix_counts`).
        Stage 1's extensions draw from a stream of their own: every other step's rows are the same with or without
        them, so a run whose parrot passes its bar in the planned steps trains as it would have without one.
        """
        rng, extension_rng = random.Random(seed), random.Random(f"{seed}-extension")
        simulate = [Row(Stage.SIMULATE, i, True) for i in range(n_examples)]
        n_parrot, n_clean = mix_counts(n_examples, clean_ratio)
        eliminate = [Row(Stage.ELIMINATE, i, True) for i in sorted(rng.sample(range(n_examples), n_parrot))] + [
            Row(Stage.ELIMINATE, i, False) for i in sorted(rng.sample(range(n_examples), n_clean))
        ]
        out: list[Row] = []
        for segment in self.segments:
            pool = simulate if segment.stage is Stage.SIMULATE else eliminate
            out.extend(_cycle(pool, segment.steps * global_batch_size, extension_rng if segment.extension else rng))
        return out

    # ---- Saving and resuming ----------------------------------------------------------------------------------

    @staticmethod
    def _saved_settings(saved: dict) -> tuple:
        """The plan's settings as `to_dict` saved them; a state written before a setting existed has its default."""
        return (saved.get("stage1_steps"), saved.get("stage2_steps"), saved.get("parrot_refresh_steps", 0),
                saved.get("parrot_refresh_interval", 1), saved.get("parrot_extension_steps", 0),
                saved.get("parrot_max_extensions", 0))

    @classmethod
    def from_dict(cls, saved: dict) -> StagePlan:
        """The plan `to_dict` saved (in a checkpoint's `sande_state.json`).

        >>> StagePlan.from_dict(StagePlan(3, 4, 2, extension_steps=5, extensions=1).to_dict()).stage1_end
        8
        """
        return cls(*cls._saved_settings(saved))

    def to_dict(self) -> dict[str, int]:
        return {"stage1_steps": self.stage1_steps, "stage2_steps": self.stage2_steps,
                "parrot_refresh_steps": self.refresh_steps, "parrot_refresh_interval": self.refresh_interval,
                "parrot_extension_steps": self.extension_steps, "parrot_max_extensions": self.extensions}

    def check_matches(self, saved: dict) -> None:
        """Raise unless the plan ``saved`` with a checkpoint is this one: a resumed run must replay the same steps.

        >>> StagePlan(4, 10, 2).check_matches({"stage1_steps": 4, "stage2_steps": 12, "parrot_refresh_steps": 2})
        Traceback (most recent call last):
        ...
        ValueError: The checkpoint was trained with 4 + 12 steps (stage 1 + stage 2) and 2 parrot refresh step(s) every 1; this run plans 4 + 10, 2 every 1: resume with the same dataset, batch size, processes and step settings.
        """
        found = self._saved_settings(saved)
        planned = (self.stage1_steps, self.stage2_steps, self.refresh_steps, self.refresh_interval,
                   self.extension_steps, self.extensions)
        if found[:4] != planned[:4]:
            raise ValueError(
                f"The checkpoint was trained with {found[0]} + {found[1]} steps (stage 1 + stage 2) and {found[2]} "
                f"parrot refresh step(s) every {found[3]}; this run plans {planned[0]} + {planned[1]}, {planned[2]} every "
                f"{planned[3]}: resume with the same dataset, batch size, processes and step settings."
            )
        if found[4:] != planned[4:]:
            raise ValueError(
                f"The checkpoint planned {found[5]} stage-1 extension(s) of {found[4]} steps; this run plans "
                f"{planned[5]} of {planned[4]}: resume with the same `parrot_extension_steps` and `parrot_max_extensions`."
            )
