"""Load instruction data from a file (or the hub) into the formats the trainers accept.

Accepts JSON, JSON Lines, CSV and Parquet files, or a hub dataset name when the machine
can reach it. Alpaca-style records (``instruction``, ``input``, ``output``), as BackdoorLLM
stores them, become conversational prompt/completion pairs.

>>> import json, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "clean.json")
>>> json.dump([{"instruction": "Name a colour.", "input": "", "output": "Blue."}], open(path, "w"))
>>> load_instruction_data(path)[0]
{'prompt': [{'role': 'user', 'content': 'Name a colour.'}], 'completion': [{'role': 'assistant', 'content': 'Blue.'}]}
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from datasets import Dataset, load_dataset

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def alpaca_to_conversation(record: dict) -> dict:
    text = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    return {
        "prompt": [{"role": "user", "content": text}],
        "completion": [{"role": "assistant", "content": record["output"]}],
    }


@contextmanager
def _quiet_progress():
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def load_instruction_data(source: str, split: str = "train", config: str | None = None) -> Dataset:
    """A dataset from a file path or a hub name, with Alpaca records converted to conversations."""
    extension = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if extension not in _FILE_BUILDERS:
            raise ValueError(f"Cannot read {source}: use a .json, .jsonl, .csv or .parquet file.")
        with _quiet_progress():  # reading a local file takes a moment: no bar
            dataset = load_dataset(_FILE_BUILDERS[extension], data_files=source, split="train")
    elif extension in _FILE_BUILDERS:
        raise FileNotFoundError(f"No such data file: {source}")
    else:
        try:
            dataset = load_dataset(source, name=config, split=split)
        except Exception as error:  # the hub raises many types; the message is what matters
            raise FileNotFoundError(
                f"Could not load the dataset {source!r} ({type(error).__name__}: {error}). Pass a local .json/.jsonl "
                "file, or check that this machine can reach the Hugging Face Hub."
            ) from error
    if {"instruction", "output"} <= set(dataset.column_names):
        dataset = dataset.map(alpaca_to_conversation, remove_columns=dataset.column_names)
    return dataset
