"""Capability through lm-evaluation-harness (the optional `lm-eval` extra), on a loaded model or a folder.

[`run_lm_eval`] runs lm-eval tasks by name: the paper's MMLU and ARC where the machine can
reach their data, or a local task that runs offline. [`write_choice_task`] writes such a
local task (a YAML file and its JSON-lines data) from labelled texts you have, for instance
BackdoorLLM's clean sst2 set as a two-choice sentiment task:

    folder = write_choice_task("sst2_local", records, choices=["negative", "positive"],
                               template="Review: {text}\\nSentiment:", folder="tasks/")
    run_lm_eval(model, tokenizer, ["sst2_local"], include_path="tasks/")  # {"sst2_local": 0.81}

The score of a multiple-choice task is lm-eval's ``acc`` (the choice with the highest
log-likelihood), a fraction in [0, 1]. To tell a defence's cost from noise, score the suspect and
the cleaned model example by example ([`lm_eval_item_scores`]) and read the change with its
paired standard error ([`paired_change`]): on a task of 200 examples, one point is two answers.

On a two-choice task an accuracy can move because the model's preference between the two
answers shifted as a whole (its label bias), with every example still ordered as before.
[`two_choice_readout`] tells the two apart from [`lm_eval_items`]: how often the model picks the
second choice, and how well its log-likelihood margins separate the classes whatever the bias
(the area under the ROC curve).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LM_EVAL_HINT = "Capability measurements need lm-evaluation-harness: `pip install 'sande-peft[lm-eval]'`."


def write_choice_task(
    name: str,
    records: Sequence[dict],
    *,
    choices: Sequence[str],
    template: str,
    folder: str | os.PathLike,
) -> Path:
    """Write an offline multiple-choice lm-eval task ``name`` into ``folder``; return the folder.

    Args:
        records: ``{"text": str, "label": int}`` items; ``label`` indexes ``choices``.
        choices: the answers scored by log-likelihood, e.g. ``["negative", "positive"]``.
        template: the prompt, with ``{text}`` where each record's text goes.

    >>> import tempfile
    >>> folder = write_choice_task("toy_choice", [{"text": "good", "label": 1}], choices=["no", "yes"],
    ...                            template="Q: {text}\\nA:", folder=tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['toy_choice.jsonl', 'toy_choice.yaml']
    """
    if "{text}" not in template:
        raise ValueError("`template` needs a `{text}` placeholder for each record's text.")
    bad = [r for r in records if not 0 <= int(r["label"]) < len(choices)]
    if bad:
        raise ValueError(f"{len(bad)} records have a label outside 0..{len(choices) - 1}, e.g. {bad[0]}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w") as f:
        for record in records:
            f.write(json.dumps({"text": record["text"], "label": int(record["label"])}) + "\n")
    # Jinja in lm-eval's task format: `{{text}}` is the record's text.
    prompt = template.replace("{text}", "{{text}}")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": prompt,
        "doc_to_choice": list(choices),
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    return folder


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
) -> dict[str, float]:
    """Accuracy of ``model`` on each lm-eval task in ``tasks``: ``{task: acc}``, fractions in [0, 1].

    Args:
        model: a loaded causal LM (a peft model too) and its ``tokenizer``.
        tasks: lm-eval task names (``"mmlu"``, ``"arc_easy"``, or a local task's name).
        include_path: a folder of local task YAML files (see [`write_choice_task`]).
        limit: at most this many examples per task.
    """
    return mean_scores(lm_eval_item_scores(model, tokenizer, tasks, include_path=include_path, limit=limit,
                                           batch_size=batch_size, num_fewshot=num_fewshot))


def mean_scores(items: dict[str, Sequence[float]]) -> dict[str, float]:
    """``{task: accuracy}`` from [`lm_eval_item_scores`]' per-example scores (lm-eval's own ``acc``)."""
    return {task: sum(scores) / len(scores) for task, scores in items.items()}


def lm_eval_item_scores(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
) -> dict[str, list[float]]:
    """Each example's ``acc`` on each lm-eval task in ``tasks``: ``{task: [1.0, 0.0, ...]}``, in the task's
    document order, so that two models scored on the same examples can be compared example by example
    ([`paired_change`]). Arguments as in [`run_lm_eval`].
    """
    return {task: [item.acc for item in items] for task, items in lm_eval_items(
        model, tokenizer, tasks, include_path=include_path, limit=limit, batch_size=batch_size,
        num_fewshot=num_fewshot).items()}


@dataclass
class ChoiceItem:
    """One example of a multiple-choice lm-eval task as lm-eval scored it: ``acc`` (1.0 or 0.0), each choice's
    log-likelihood in the task's choice order, and the index of the right choice (`None` where the task names
    it by its text, as some lm-eval tasks do: the accuracy stands, the choice readout cannot read it)."""

    acc: float
    loglikelihoods: tuple[float, ...]
    target: int | None


def lm_eval_items(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
) -> dict[str, list[ChoiceItem]]:
    """Each example of each multiple-choice lm-eval task in ``tasks`` as a [`ChoiceItem`], in the task's document
    order. Arguments as in [`run_lm_eval`]."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(LM_EVAL_HINT) from error
    if not tasks:
        raise ValueError("Name at least one lm-eval task, e.g. `arc_easy` or a local task written by write_choice_task.")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(f"Unknown lm-eval task(s) {unknown}: not in lm-eval's registry{where}.")
    device = str(next(model.parameters()).device)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0,
                                          verbosity="WARNING")
    finally:
        model.train(was_training)
    return {task: [ChoiceItem(acc=float(s["acc"]), loglikelihoods=tuple(float(r[0]) for r in s["filtered_resps"]),
                              # lm-eval's label as an index; a text or list label is left unread
                              target=s["target"] if isinstance(s["target"], int) else None)
                   for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
            for task in tasks}


@dataclass
class TwoChoiceReadout:
    """A model's answers on a two-choice task, its label bias apart (see [`two_choice_readout`]).

    Args:
        accuracy: the share of examples whose right choice has the higher log-likelihood (lm-eval's ``acc``).
        second_choice_share: the share of examples on which the model picks the second choice.
        auc: the chance that an example of the second class gets a larger margin (second choice's
            log-likelihood minus the first's) than an example of the first class; 0.5 is chance, 1.0 perfect.
            Adding any constant to every margin (a label bias) leaves it unchanged.
        best_threshold_accuracy: the accuracy of the same margins cut at the threshold that suits these
            examples best: what the model's ordering allows once the bias is set right (chosen on the
            examples it is read on, so an upper bound).
    """

    accuracy: float
    second_choice_share: float
    auc: float
    best_threshold_accuracy: float


def two_choice_readout(items: Sequence[ChoiceItem]) -> TwoChoiceReadout:
    """Accuracy, label bias and class separation of a model's answers on a two-choice task.

    >>> items = [ChoiceItem(0.0, (-2.0, -1.0), 0), ChoiceItem(1.0, (-3.0, -1.0), 1), ChoiceItem(1.0, (-1.0, -1.5), 0)]
    >>> r = two_choice_readout(items)  # margins 1.0 (class 0), 2.0 (class 1), -0.5 (class 0)
    >>> round(r.accuracy, 3), round(r.second_choice_share, 3), r.auc, r.best_threshold_accuracy
    (0.667, 0.667, 1.0, 1.0)
    """
    margins, labels = _margins(items)
    cuts = sorted(set(margins))
    best = max(sum((m >= cut) == (y == 1) for m, y in zip(margins, labels)) for cut in cuts + [math.inf])
    return TwoChoiceReadout(
        accuracy=sum(item.acc for item in items) / len(items),
        second_choice_share=sum(m > 0 for m in margins) / len(margins),
        auc=_auc(margins, labels),
        best_threshold_accuracy=best / len(items),
    )


@dataclass
class AucChange:
    """How the class separation (AUC) of a two-choice task changed between two models (see [`paired_auc_change`]).

    Args:
        before / after: each model's AUC on all the examples.
        change: ``after - before``.
        standard_error: its paired bootstrap standard error (both models read on the same resampled examples).
        resamples: the bootstrap resamples it rests on.
    """

    before: float
    after: float
    change: float
    standard_error: float
    resamples: int


def paired_auc_change(before: Sequence[ChoiceItem], after: Sequence[ChoiceItem], resamples: int = 1000,
                      seed: int = 0) -> AucChange:
    """The change of [`two_choice_readout`]'s AUC from ``before`` to ``after`` (two models' [`ChoiceItem`]s on the
    same examples, in the same order), with a paired bootstrap standard error over the examples.

    >>> a = [ChoiceItem(1.0, (0.0, float(m)), y) for m, y in [(3, 1), (2, 1), (1, 0), (0, 0), (-1, 1), (-2, 0)]]
    >>> c = paired_auc_change(a, a)
    >>> round(c.before, 3), c.change, c.standard_error
    (0.778, 0.0, 0.0)
    """
    if len(before) != len(after) or [i.target for i in before] != [i.target for i in after]:
        raise ValueError("Paired AUCs need the same examples for both models, in the same order: score both on the "
                         "same task, with the same `limit`.")
    (m0, labels), (m1, _) = _margins(before), _margins(after)
    rng = random.Random(seed)
    n, diffs = len(labels), []
    while len(diffs) < resamples:
        pick = [rng.randrange(n) for _ in range(n)]
        drawn = [labels[i] for i in pick]
        if 0 < sum(drawn) < n:  # a resample of one class has no AUC
            diffs.append(_auc([m1[i] for i in pick], drawn) - _auc([m0[i] for i in pick], drawn))
    mean = sum(diffs) / len(diffs)
    auc0, auc1 = _auc(m0, labels), _auc(m1, labels)
    return AucChange(before=auc0, after=auc1, change=auc1 - auc0, resamples=resamples,
                     standard_error=math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)))


def _margins(items: Sequence[ChoiceItem]) -> tuple[list[float], list[int]]:
    """Each example's second-minus-first log-likelihood margin, and its class."""
    if any(len(item.loglikelihoods) != 2 for item in items):
        raise ValueError("The choice readout reads two-choice tasks; an example here has "
                         f"{next(len(i.loglikelihoods) for i in items if len(i.loglikelihoods) != 2)} choices.")
    labels = [item.target for item in items]
    if None in labels:
        raise ValueError("The choice readout needs each example's right choice as an index; this task's samples "
                         "name it otherwise (by its text). Write the task with integer labels (`write_choice_task`).")
    if len(set(labels)) < 2:
        raise ValueError("The separation of two classes needs examples of both; these are all of one class.")
    return [item.loglikelihoods[1] - item.loglikelihoods[0] for item in items], labels


def _auc(margins: Sequence[float], labels: Sequence[int]) -> float:
    """Mann-Whitney: the share of (first-class, second-class) pairs the margins order rightly, ties counted half."""
    second = sorted(m for m, y in zip(margins, labels) if y == 1)
    first = [m for m, y in zip(margins, labels) if y == 0]
    above = sum(len(second) - bisect.bisect_right(second, m)
                + 0.5 * (bisect.bisect_right(second, m) - bisect.bisect_left(second, m)) for m in first)
    return above / (len(first) * len(second))


@dataclass
class PairedChange:
    """How a score changed between two models scored on the same examples (see [`paired_change`]).

    Args:
        before / after: the mean score of each model.
        change: ``after - before``.
        standard_error: the standard error of ``change`` over the examples (paired: what both models get
            right or wrong alike does not count); a change within about two of these is not told from noise.
        n: the examples scored.
        gained / lost: examples the second model scores higher / lower on.
    """

    before: float
    after: float
    change: float
    standard_error: float
    n: int
    gained: int
    lost: int


def paired_change(before: Sequence[float], after: Sequence[float]) -> PairedChange:
    """The change from ``before`` to ``after``, two models' per-example scores on the same examples in the same
    order (from [`lm_eval_item_scores`]), with its paired standard error.

    >>> c = paired_change([1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0, 1, 0])
    >>> round(c.change, 3), round(c.standard_error, 3), c.gained, c.lost
    (-0.125, 0.227, 1, 2)
    """
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"Paired scores need the same examples for both models, at least 2; got {len(before)} "
                         f"and {len(after)}: score both on the same task, with the same `limit`.")
    diffs = [a - b for b, a in zip(before, after)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return PairedChange(before=sum(before) / n, after=sum(after) / n, change=mean,
                        standard_error=math.sqrt(variance / n), n=n, gained=sum(d > 0 for d in diffs),
                        lost=sum(d < 0 for d in diffs))
