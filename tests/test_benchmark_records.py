"""Every benchmark record says what made it: commit, command, machine, the load on its cores, date."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


def _common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_record_is_appended_with_its_provenance(tmp_path):
    common = _common()
    out = tmp_path / "records.jsonl"
    common.print_record({"case": "a"}, out=str(out))
    common.print_record({"case": "b"}, out=str(out))

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in records] == ["a", "b"]
    first = records[0]
    assert "torch" in first["machine"]
    if not torch.cuda.is_available():
        assert f"{os.cpu_count()} CPU cores" in first["machine"]
    assert first["commit"] and first["command"].startswith("python ") and first["date"]
    # Timings are read against how busy the cores were.
    assert first["load_average"] is None or first["load_average"] >= 0
