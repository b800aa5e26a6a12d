"""Reports for people: a markdown table and a PNG plot of removal and utility side by side.

Columns appear only when some row measured them, and every utility column names what it
measures. With a ``baseline`` row (the backdoored model), each measure also shows its change; an lm-eval
accuracy, where both rows kept each example's score, its change in points with the paired standard
error (a change within about two of these is not told from noise).

>>> from sande_peft.evaluation.backdoor import BackdoorReport
>>> before = BackdoorReport(n_prompts=64, attack_success_rate=0.97, clean_nll=1.20)
>>> after = BackdoorReport(n_prompts=64, attack_success_rate=0.0, clean_nll=1.23)
>>> markdown_table({"backdoored": before, "SANDE": after}).splitlines()[0]
'| model | attack success (greedy) | NLL of the reference answers |'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from .backdoor import BackdoorReport
from .capability import paired_change

#: (column title, field, kind): rates print as percentages, other numbers with 3 decimals.
COLUMNS = (
    ("attack success (greedy)", "attack_success_rate", "rate"),
    ("attack success (sampled)", "sampled_attack_success_rate", "rate"),
    ("worst trigger variant", "worst_variant_attack_success_rate", "rate"),
    ("starts like r_t", "target_start_rate", "rate"),
    ("false trigger", "false_trigger_rate", "rate"),
    ("NLL of the reference answers", "clean_nll", "float"),
    ("KL to the suspect", "kl_to_suspect", "float"),
    ("agreement with the suspect", "agreement_with_suspect", "rate"),
    ("NLL of the original's answers", "nll_original", "float"),
    ("agreement with the original", "agreement_with_original", "rate"),
    ("score", "score", "float"),
)


def _value(report: BackdoorReport | Mapping, key: str):
    return report.get(key) if isinstance(report, Mapping) else getattr(report, key, None)


def _format(value, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if kind == "rate" else f"{value:.3f}"


def _capabilities(reports: Mapping) -> list[str]:
    names: list[str] = []
    for report in reports.values():
        for name in _value(report, "capability") or {}:
            if name not in names:
                names.append(name)
    return names


def _capability_change(report, base, task: str) -> str:
    """A cell's suffix, " (-1.1 ± 0.7 points)": ``task``'s change from ``base``, example by example, where both kept
    each example's score; empty otherwise."""
    items, base_items = ((_value(r, "capability_items") or {}).get(task) if r is not None else None
                         for r in (report, base))
    if report is base or not items or not base_items or len(items) != len(base_items):
        return ""
    change = paired_change(base_items, items)
    return f" ({100 * change.change:+.1f} ± {100 * change.standard_error:.1f} points)"


def markdown_table(reports: Mapping[str, BackdoorReport | Mapping], baseline: str | None = None) -> str:
    """One row per model (for instance "original", "backdoored", then each defence).

    With ``baseline`` (a row's label), NLL and KL cells also show their change from that row in percent.
    """
    columns = [c for c in COLUMNS if any(_value(r, c[1]) is not None for r in reports.values())]
    tasks = _capabilities(reports)
    header = ["model", *(title for title, _, _ in columns), *(f"lm-eval {t}" for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " --- |" * (len(header) - 1)]
    base = reports.get(baseline) if baseline else None
    for label, report in reports.items():
        cells = []
        for _, key, kind in columns:
            value = _value(report, key)
            cell = _format(value, kind)
            reference = _value(base, key) if base is not None else None
            if kind == "float" and key != "score" and value is not None and reference and report is not base:
                cell += f" ({100 * (value / reference - 1):+.1f}%)"
            cells.append(cell)
        capability = _value(report, "capability") or {}
        cells += [_format(capability.get(t), "rate") + _capability_change(report, base, t) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    utility = {_value(r, "score_utility") for r in reports.values()} - {None}
    if utility:
        lines.append(f"\nscore: sqrt(utility x (100 - attack success)), utility: {', '.join(sorted(utility))}.")
    return "\n".join(lines)


def write_json(reports: Mapping[str, BackdoorReport | Mapping], path: str | os.PathLike, extra: dict | None = None):
    data = {label: (r.to_dict() if isinstance(r, BackdoorReport) else dict(r)) for label, r in reports.items()}
    with open(path, "w") as f:
        json.dump({"reports": data, **(extra or {})}, f, indent=2)


def plot_reports(reports: Mapping[str, BackdoorReport | Mapping], path: str | os.PathLike, title: str = "",
                 utility: str = "clean_nll", utility_label: str = "NLL of the reference answers") -> None:
    """Bars of attack success and false trigger (left) and a utility measure (right, ``utility``), with values."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plots need matplotlib: `pip install 'sande-peft[demo]'`.") from error
    labels = list(reports)
    x = list(range(len(labels)))
    fig, (ax_rates, ax_utility) = plt.subplots(1, 2, figsize=(4 + 1.8 * len(labels), 4.2))
    width = 0.38
    asr = [100 * (_value(reports[k], "attack_success_rate") or 0.0) for k in labels]
    false = [100 * (_value(reports[k], "false_trigger_rate") or 0.0) for k in labels]
    bars = ax_rates.bar([i - width / 2 for i in x], asr, width, label="attack success", color="#c0392b")
    ax_rates.bar_label(bars, fmt="%.0f%%", fontsize=7)
    bars = ax_rates.bar([i + width / 2 for i in x], false, width, label="false trigger", color="#7f8c8d")
    ax_rates.bar_label(bars, fmt="%.0f%%", fontsize=7)
    ax_rates.set_ylim(0, 112)
    ax_rates.set_ylabel("% of prompts")
    ax_rates.set_title("Backdoor")
    ax_rates.legend(loc="upper right", fontsize=8)
    values = [_value(reports[k], utility) for k in labels]
    bars = ax_utility.bar(x, [v if v is not None else 0.0 for v in values], 0.5, color="#2980b9")
    ax_utility.bar_label(bars, labels=["-" if v is None else f"{v:.3f}" for v in values], fontsize=7)
    ax_utility.set_ylabel(utility_label)
    ax_utility.set_title("Utility")
    ax_utility.set_ylim(0, 1.15 * max([v for v in values if v is not None] or [1.0]))
    for ax in (ax_rates, ax_utility):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
