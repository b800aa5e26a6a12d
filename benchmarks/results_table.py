"""Turn the JSON lines written by real_model.py into the markdown tables of docs/results.md.

    python benchmarks/results_table.py docs/results/real_model.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

METHOD_NAMES = OrderedDict(
    [
        ("none", "backdoored (no defence)"),
        ("sft", "plain SFT"),
        ("osft", "OSFT (told the trigger)"),
        ("sande", "SANDE"),
        ("sande-start", "SANDE, start-only parrot"),
        ("sande-p", "SANDE-P (first 2 words of r_t)"),
    ]
)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def variant_of(record: dict) -> str:
    return record.get("variant") or "default"


def load(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as f:
            records.extend(json.loads(line) for line in f if line.strip())
    # the last record of a (task, attack, method, variant) wins: reruns replace earlier numbers
    latest = OrderedDict()
    for r in records:
        latest[(r["task"], r["attack"], r["method"], variant_of(r))] = r
    return list(latest.values())


def case_table(records: list[dict]) -> str:
    base = next((r for r in records if r["method"] == "none"), None)
    lines = [
        "| method | attack success (target) | judge | false trigger | clean NLL | parrot after stage 1 / 2 | train time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(method, name, r) for method, name in METHOD_NAMES.items() for r in records if r["method"] == method]
    for method, name, r in rows:
        if variant_of(r) != "default":
            name = f"{name}, {variant_of(r)}"
        nll = f"{r['clean_nll']:.3f}"
        if base and method != "none":
            nll += f" ({100 * (r['clean_nll'] / base['clean_nll'] - 1):+.1f}%)"
        parrot = r.get("parrot_success") or {}
        parrot_cell = (
            f"{pct(parrot.get('after_simulate'))} / {pct(parrot.get('after_eliminate'))}" if parrot else "-"
        )
        seconds = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
        lines.append(
            f"| {name} | {pct(r['attack_success_rate'])} | {pct(r.get('judge_rate'))} | {pct(r['false_trigger_rate'])} "
            f"| {nll} | {parrot_cell} | {seconds} |"
        )
    return "\n".join(lines)


def render(records: list[dict]) -> str:
    out = []
    cases = OrderedDict()
    for r in records:
        cases.setdefault((r["task"], r["attack"]), []).append(r)
    for (task, attack), rs in cases.items():
        implant = next((r for r in rs if r["method"] == "implant"), None)
        out.append(f"### {task} / {attack}\n")
        if implant:
            verdict = "passed" if implant["passed"] else "FAILED (case not defended)"
            out.append(
                f"Implant: {implant['implant_steps']} LoRA steps, quality gate {verdict}: attack success "
                f"{pct(implant['attack_success_rate'])}, false trigger {pct(implant['false_trigger_rate'])} "
                f"on held-out prompts.\n"
            )
        out.append(case_table(rs))
        machine = rs[-1].get("machine")
        n = next((r.get("n_prompts") for r in rs if r.get("n_prompts")), None)
        out.append(f"\n{n} triggered and {n} clean test prompts; machine: {machine}.\n")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    print(render(load(args.paths)))


if __name__ == "__main__":
    main()
