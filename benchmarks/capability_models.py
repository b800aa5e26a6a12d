"""Capability before and after a defence, example by example: is the change told from noise?

Each pair is a suspect model and the model a defence made from it, scored on the same offline
lm-eval task (BackdoorLLM's clean sst2 sentences as a two-choice task: the 201 test sentences
and the 501 clean training ones, 702 in all; no defence trains on sst2). The record gives both
accuracies, the change with its paired standard error, and the same on the first 201 examples
alone (the task the real-model records report), so that a record can be matched to its run; and
for each model how often it answers "Positive" and how well its margins separate the two classes
whatever that share (`two_choice_readout`), and that separation's change with its paired bootstrap error
(`paired_auc_change`): a change of label bias, told from a loss of the skill.
One JSON line per pair, with the commit, command and machine.

    C=.cache/real_model
    python benchmarks/capability_models.py \\
        --pair deployment-hate $C/backdoored-deployment-hate-s150 $C/runs/deployment-hate-sande-0 \\
        --pair SmolLM2-vs-demo original .cache/demo_variants/backdoored --out docs/results/capability.jsonl

A path is a model folder, or an adapter folder on its base (a cleaned model); ``original`` is
SmolLM2-135M-Instruct itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402
from common import REPO, model_path, print_record  # noqa: E402

TEST_EXAMPLES = 201  # the test sentences come first in the 702-example task


def scored_items(path: str, task: str, folder: str, cache: dict) -> list:
    """The per-example `ChoiceItem`s of the model at ``path`` (loaded once per path)."""
    if path not in cache:
        from transformers import AutoTokenizer

        from sande_peft.evaluation.capability import lm_eval_items
        from sande_peft.loading import load_model

        model, _ = load_model(model_path(path), dtype=torch.float32)  # as the real-model records measured
        tokenizer = AutoTokenizer.from_pretrained(model_path(path))
        cache[path] = lm_eval_items(model, tokenizer, [task], include_path=folder)[task]
        del model
    return cache[path]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "SUSPECT", "CLEANED"),
                        help="a label, the suspect model's path and the defended model's path")
    parser.add_argument("--tasks-dir", default=str(REPO / ".cache" / "real_model" / "lm_eval_tasks"))
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    from sande_peft.evaluation.capability import paired_auc_change, paired_change, two_choice_readout

    task = backdoorllm.write_sst2_task(args.tasks_dir, with_train_pool=True)
    cache: dict = {}
    for label, suspect, cleaned in args.pair:
        start = time.time()
        items = [scored_items(p, task, args.tasks_dir, cache) for p in (suspect, cleaned)]
        before, after = ([item.acc for item in model_items] for model_items in items)
        whole, test = paired_change(before, after), paired_change(before[:TEST_EXAMPLES], after[:TEST_EXAMPLES])
        readout = {side: vars(two_choice_readout(model_items)) for side, model_items in zip(("before", "after"), items)}
        print_record({"benchmark": "capability", "label": label, "suspect": suspect, "cleaned": cleaned,
                      "task": task, **vars(whole), "test_set": vars(test), "readout": readout,
                      "auc_change": vars(paired_auc_change(*items)),
                      "seconds": round(time.time() - start, 1)}, args.out)


if __name__ == "__main__":
    main()
