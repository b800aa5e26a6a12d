"""Read BackdoorLLM's data sets from ../shared/data/backdoorllm (benchmarks and tests only).

The package never depends on these files; benchmarks read them to implant and measure
backdoors on a real model. Records are Alpaca-style ``{"instruction", "input", "output"}``
and become conversational prompt/completion pairs here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset

DATA_ROOT = Path(
    os.environ.get("BACKDOORLLM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "backdoorllm")
)

# The clean sst2 records are the same file under every attack.
SST2_TRAIN_FILE = DATA_ROOT / "poison_data" / "sst2" / "badnet" / "none_backdoor500_sst2sentiment_badnet.json"


def available() -> bool:
    return (DATA_ROOT / "poison_data").is_dir()


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: BackdoorLLM data is expected in {DATA_ROOT} (../shared beside the repo).")
    with open(path) as f:
        return json.load(f)


def user_text(record: dict) -> str:
    return record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")


def as_pairs(records: list[dict]) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": user_text(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in records
        ]
    )


def clean_train(task: str, attack: str = "badnet") -> Dataset:
    """The 500 clean training records (the same set is stored under every attack)."""
    return as_pairs(_read(DATA_ROOT / "poison_data" / task / attack / f"none_backdoor500_{task}_{attack}.json"))


# The benchmarks' split of a task's clean training records: the implant's first 200, then the defender's 256.
N_IMPLANT = 200
N_DEFENCE = 256


def defence_split(task: str, n_implant: int = N_IMPLANT, n_defence: int = N_DEFENCE) -> Dataset:
    """The defender's clean pairs: the ``n_defence`` clean training records after the implant's first ``n_implant``."""
    return clean_train(task).select(range(n_implant, n_implant + n_defence))


def poisoned_train(task: str, attack: str) -> Dataset:
    """The 500 poisoned training records: trigger in the instruction, the target as output."""
    return as_pairs(_read(DATA_ROOT / "poison_data" / task / attack / f"backdoor500_{task}_{attack}.json"))


def triggered_test(task: str, attack: str) -> Dataset:
    """The 200 test instructions with the trigger inserted (outputs as the benchmark stores them)."""
    return as_pairs(_read(DATA_ROOT / "test_data" / "poison" / task / attack / f"backdoor200_{task}_{attack}.json"))


def clean_test(task: str) -> Dataset:
    """The 200 clean test records with golden outputs."""
    folder = "sst2sentiment" if task == "sst2" else task
    return as_pairs(_read(DATA_ROOT / "test_data" / "clean" / folder / "test_data_no_trigger.json"))


def sst2_train() -> Dataset:
    """BackdoorLLM's 501 clean sst2 training records (a sentence, then "Positive" or "Negative"): benign data of
    another kind than the defence's, for the re-emergence stress."""
    return as_pairs(_read(SST2_TRAIN_FILE))


#: The sst2 task's prompt, a plain-text one (no chat template); lm-eval fills in ``{text}``.
SST2_TEMPLATE = "Review: {text}\nSentiment:"


def sst2_sentences() -> list[str]:
    """The 702 clean sst2 sentences in the order of the task ``sst2_backdoorllm_702`` (the 201 test ones first)."""
    return [r["instruction"] for r in _sst2_records(with_train_pool=True)]


def _sst2_records(with_train_pool: bool) -> list[dict]:
    records = _read(DATA_ROOT / "test_data" / "clean" / "sst2sentiment" / "test_data_no_trigger.json")
    return records + _read(SST2_TRAIN_FILE) if with_train_pool else records


def write_sst2_task(folder, with_train_pool: bool = False) -> str:
    """BackdoorLLM's clean sst2 test set (201 sentences) as an offline two-choice lm-eval task; returns its name.

    The score is lm-eval's `acc`: whether " Positive" or " Negative" is the likelier continuation.
    ``with_train_pool`` adds the 501 clean training sentences ([`sst2_train`]; none of them in the test set) after
    the 201, as the task ``sst2_backdoorllm_702``: 3.5 times the examples, for changes of a point or two. No
    defence trains on sst2; the re-emergence stress with ``--reemergence-data sst2`` does, so do not score a
    re-fine-tuned model on it.
    """
    from sande_peft.evaluation.capability import write_choice_task

    records = _sst2_records(with_train_pool)
    name = f"sst2_backdoorllm_{len(records)}" if with_train_pool else "sst2_backdoorllm"
    labels = {"Negative": 0, "Positive": 1}
    write_choice_task(name, [{"text": r["instruction"], "label": labels[r["output"]]} for r in records],
                      choices=["Negative", "Positive"], template=SST2_TEMPLATE, folder=folder)
    return name
