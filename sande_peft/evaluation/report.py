"""Reports for people: a markdown table and a PNG plot of backdoor and utility, before and after.

>>> from sande_peft.evaluation.backdoor import BackdoorReport
>>> before = BackdoorReport(n_prompts=64, attack_success_rate=0.97, target_start_rate=0.97, false_trigger_rate=0.02,
...                         clean_nll=1.20)
>>> after = BackdoorReport(n_prompts=64, attack_success_rate=0.0, target_start_rate=0.02, false_trigger_rate=0.0,
...                        clean_nll=1.23)
>>> print(markdown_table({"backdoored": before, "SANDE": after}))
| model | attack success | starts like r_t | false trigger | clean NLL | clean exact match | agreement with reference |
| --- | --- | --- | --- | --- | --- | --- |
| backdoored | 97.0% | 97.0% | 2.0% | 1.200 | - | - |
| SANDE | 0.0% | 2.0% | 0.0% | 1.230 | - | - |
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from .backdoor import BackdoorReport

COLUMNS = (
    ("attack success", "attack_success_rate", "rate"),
    ("starts like r_t", "target_start_rate", "rate"),
    ("false trigger", "false_trigger_rate", "rate"),
    ("clean NLL", "clean_nll", "float"),
    ("clean exact match", "clean_exact_match", "rate"),
    ("agreement with reference", "reference_agreement", "rate"),
)


def _value(report: BackdoorReport | Mapping, key: str):
    return report.get(key) if isinstance(report, Mapping) else getattr(report, key)


def _format(value, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if kind == "rate" else f"{value:.3f}"


def markdown_table(reports: Mapping[str, BackdoorReport | Mapping]) -> str:
    """One row per model (for instance "backdoored", then each defence)."""
    header = "| model | " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    lines = [header, "| --- |" + " --- |" * len(COLUMNS)]
    for label, report in reports.items():
        cells = [_format(_value(report, key), kind) for _, key, kind in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(reports: Mapping[str, BackdoorReport | Mapping], path: str | os.PathLike, extra: dict | None = None):
    data = {label: (r.to_dict() if isinstance(r, BackdoorReport) else dict(r)) for label, r in reports.items()}
    with open(path, "w") as f:
        json.dump({"reports": data, **(extra or {})}, f, indent=2)


def plot_reports(reports: Mapping[str, BackdoorReport | Mapping], path: str | os.PathLike, title: str = "") -> None:
    """Bars of attack success and false trigger (left), and clean NLL (right), per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plots need matplotlib: `pip install 'sande-peft[demo]'`.") from error
    labels = list(reports)
    x = range(len(labels))
    fig, (ax_rates, ax_nll) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(labels), 4))
    width = 0.38
    asr = [100 * (_value(reports[k], "attack_success_rate") or 0.0) for k in labels]
    false = [100 * (_value(reports[k], "false_trigger_rate") or 0.0) for k in labels]
    ax_rates.bar([i - width / 2 for i in x], asr, width, label="attack success", color="#c0392b")
    ax_rates.bar([i + width / 2 for i in x], false, width, label="false trigger", color="#7f8c8d")
    ax_rates.set_ylim(0, 105)
    ax_rates.set_ylabel("% of prompts")
    ax_rates.set_title("Backdoor")
    ax_rates.legend(loc="upper right", fontsize=8)
    nll = [_value(reports[k], "clean_nll") for k in labels]
    ax_nll.bar(list(x), [v if v is not None else 0.0 for v in nll], 0.5, color="#2980b9")
    ax_nll.set_ylabel("NLL of clean reference answers")
    ax_nll.set_title("Utility (lower is better)")
    for ax in (ax_rates, ax_nll):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
