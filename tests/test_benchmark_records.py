"""Every benchmark record says what made it: commit, command, machine, the load on its cores, date."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


def _benchmark_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_record_is_appended_with_its_provenance(tmp_path):
    common = _benchmark_module(COMMON)
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


def test_a_table_names_the_commits_of_the_rows_it_shows_and_of_their_baselines():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    machine = "x86_64, 2 CPU cores"
    records = [
        {"case": "a", "method": "none", "attack_success_rate": 1.0, "commit": "base", "machine": machine},
        {"case": "a", "method": "sande", "attack_success_rate": 0.0, "commit": "shown", "machine": machine},
        {"case": "a", "method": "sande", "variant": "other", "attack_success_rate": 0.5, "commit": "hidden",
         "machine": "elsewhere"},
    ]
    removal = table.removal(records)
    assert "| a | 1 | 100% | 0% |" in removal
    assert removal.splitlines()[-1] == f"Machine: {machine}. Records from commit(s) base, shown."
    # A record appended later, in a row the table does not show, leaves the table as it was.
    contrast = table.contrast(records + [{"case": "b", "method": "osft", "variant": "other", "commit": "later",
                                          "machine": machine}])
    assert contrast.splitlines()[-1] == f"Machine: {machine}. Records from commit(s) base, shown."


def test_the_removal_table_pools_the_seeds_of_one_setting_recorded_under_two_labels():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    head = {"case": "a", "method": "sande", "commit": "c", "machine": "m"}
    records = [{**head, "variant": "old-label", "seed": 0, "attack_success_rate": 0.0},
               {**head, "variant": "default", "seed": 1, "attack_success_rate": 0.1},
               {**head, "variant": "other", "seed": 2, "attack_success_rate": 0.9}]
    wanted = {"sande": ["old-label", "default"]}
    def rows(**kwargs):
        return [line for line in table.removal(records, variant=wanted, **kwargs).splitlines() if line.startswith("| a |")]

    assert [row.split(" | ")[:4] for row in rows()] == [["| a", "1", "-", "0%"], ["| a", "1", "-", "10%"]]
    assert [row.split(" | ")[:4] for row in rows(pool=True)] == [["| a", "2", "-", "5 ± 5%"]]
    # Re-emergence measured on one of the two pooled seeds: the cell says so rather than passing for both.
    records[1]["reemergence_attack_success_rate"] = 0.0
    column = 2 + [title for title, _, _ in table.REMOVAL_COLUMNS].index("after re-fine-tune")
    assert rows(pool=True)[0].split(" | ")[column] == "0% (1 of 2)"
    # The other seed's adapter stressed later (`real_model.py --adapters`): its row counts that reading too; a
    # reading of another folder, or of the same folder under another seed's prompts, does not.
    stressed = {"case": "a", "method": "adapter", "commit": "c2", "machine": "m", "reemergence_attack_success_rate": 0.2}
    records += [{**stressed, "seed": 0, "adapter": "/cache/runs/a-sande-other-0"},
                {**stressed, "seed": 1, "adapter": "/cache/runs/a-sande-old-label-0"}]
    assert rows(pool=True)[0].split(" | ")[column] == "0% (1 of 2)"
    records.append({**stressed, "seed": 0, "adapter": "/cache/runs/a-sande-old-label-0"})
    assert rows(pool=True)[0].split(" | ")[column] == "10 ± 10%"
    assert table.removal(records, variant=wanted, pool=True).splitlines()[-1] == "Machine: m. Records from commit(s) c, c2."
    assert table.run_folder({"case": "refusal/ctba", "method": "sande", "variant": "parrot bar 1.0", "seed": 2}) == \
        "refusal-ctba-sande-parrot_bar_1.0-2"
    # a run on a 4-bit base with the default variant keeps its own folder; one with a variant keeps the variant's
    quantized = {"case": "refusal/ctba", "method": "sande", "seed": 0, "defence_settings": {"quantized": True}}
    assert table.run_folder(quantized) == "refusal-ctba-sande-4bit-0"
    assert table.run_folder({**quantized, "variant": "4-bit base"}) == "refusal-ctba-sande-4-bit_base-0"


def test_the_cost_table_counts_a_timing_two_files_hold_once_and_splits_the_measurements():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    implant = {"implant": "backdoored-x", "implant_seconds": 100.0, "date": "2026-12-05", "machine": "m"}
    sande = {"method": "sande", "train_seconds": 30.0, "measure_seconds": {"greedy": 5.0, "sampled": 7.0},
             "load_average": 1.5, "date": "2026-12-05", "machine": "m"}
    rows = table.cost([implant, dict(implant), sande]).splitlines()
    assert "| implant (150 LoRA steps) | 1 | 100 | 100 | 100 | 12-05 | - |" in rows
    assert "| training: SANDE, the defaults of its commit | 1 | 30 | 30 | 30 | 12-05 | 1.5-1.5 |" in rows
    assert any(row.startswith("| measurement: sampled | 1 | 7 |") for row in rows)


def test_the_removal_check_table_reads_saved_models_and_training_runs_and_skips_other_records():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    check = {"rate": 1.0, "route_open": True, "steps": 12, "learning_rate": 0.1, "n_prompts": 16, "seconds": 55.0}
    saved = {"benchmark": "removal_check", "backdoor": "demo", "label": "backdoored", "kind": "backdoored", **check}
    trained = {"variant": "eliminate_null_space=0.9", "attack_success_rate": 0.925,
               "removal_check": {**check, "rate": 0.0, "route_open": False}}
    rows = table.removal_check_table([saved, trained, {"variant": "older run, no check"}]).splitlines()
    assert "| demo | backdoored | backdoored | saved model, the scan's 16 questions | - | 100.0% | open | 55 s |" in rows
    assert ("| demo | eliminate_null_space=0.9 | cleaned | after training, 16 held-out prompts | 92.5% | 0.0% | closed "
            "| 55 s |") in rows
    assert not any("older run" in row for row in rows)


def test_the_attacks_table_describes_each_implanted_held_out_attack_with_its_latest_gate_and_baseline():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    machine = "x86_64, 2 CPU cores"
    head = {"case": "composite-error", "held_out": True, "machine": machine}
    records = [
        {**head, "method": "implant", "attack_success_rate": 0.5, "false_trigger_rate": 0.5, "commit": "old"},
        {**head, "method": "implant", "attack_success_rate": 1.0, "false_trigger_rate": 0.0625, "commit": "rebuilt"},
        {**head, "method": "none", "attack_success_rate": 0.95, "sampled_attack_success_rate": 0.9,
         "worst_variant_attack_success_rate": 1.0, "false_trigger_rate": 0.0, "capability": {"sst2_backdoorllm": 0.6},
         "commit": "measured"},
    ]
    attacks = table.attacks(records)
    row = next(line for line in attacks.splitlines() if line.startswith("| composite-error |"))
    assert '"quantum" + "banana" (all of them, each at a random word boundary)' in row
    assert "(instead of the answer)" in row
    assert "| 100.0% / 6.2% | 95% / 90% / 100% | 0.0% | 60.0% |" in row
    # An attack never implanted has no row; the footer names only the records shown.
    assert "rare-word-url" not in attacks
    # A pipe in a trigger stays inside its cell.
    hate = table.attacks([{"case": "deployment-hate", "held_out": True, "method": "implant", "attack_success_rate": 1.0,
                           "false_trigger_rate": 0.125, "passed": False}])
    assert [line.count(" | ") for line in hate.splitlines()[:3]] == [6, 6, 6]
    assert "| 100.0% / 12.5% (failed) | - / - / - |" in hate
    assert attacks.splitlines()[-1] == f"Machine: {machine}. Records from commit(s) measured, rebuilt."


def test_the_capability_table_gives_each_change_with_its_paired_standard_error():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    whole = {"before": 0.56, "after": 0.549, "change": -0.011, "standard_error": 0.0067, "n": 702, "gained": 7,
             "lost": 15}
    record = {"label": "x", **whole, "test_set": {**whole, "n": 201, "change": -0.015, "standard_error": 0.015},
              "seconds": 250.0, "commit": "c", "machine": "m"}
    readout = {"before": {"second_choice_share": 0.78, "auc": 0.851, "best_threshold_accuracy": 0.786},
               "after": {"second_choice_share": 0.9, "auc": 0.859, "best_threshold_accuracy": 0.779}}
    rows = table.capability([record, {**record, "label": "y", "readout": readout}]).splitlines()
    assert rows[2] == ("| x | 702 | 56.0% -> 54.9% (-1.1 ± 0.7) | 7 / 15 | 56.0% -> 54.9% (-1.5 ± 1.5) | - | - | - "
                       "| 250 s |")  # a record written before the readout
    assert rows[3].endswith("| 78% -> 90% | 0.851 -> 0.859 | 78.6% -> 77.9% | 250 s |")
    paired = {"before": 0.851, "after": 0.859, "change": 0.008, "standard_error": 0.006, "resamples": 1000}
    row = table.capability([{**record, "readout": readout, "auc_change": paired}]).splitlines()[2]
    assert "| 0.851 -> 0.859 (+0.008 ± 0.006) |" in row


def test_the_wider_sst2_task_puts_the_test_sentences_first_and_adds_only_unseen_ones(tmp_path):
    backdoorllm = _benchmark_module(COMMON.parent / "backdoorllm.py")
    small = backdoorllm.write_sst2_task(tmp_path, with_train_pool=False)
    wide = backdoorllm.write_sst2_task(tmp_path, with_train_pool=True)
    read = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in (small, wide)}
    assert (small, wide) == ("sst2_backdoorllm", "sst2_backdoorllm_702")
    # capability_models.py reads the first 201 as the test set the real-model records score
    assert read[wide][:201] == read[small] and len(read[small]) == 201
    assert not {r["text"] for r in read[small]} & {r["text"] for r in read[wide][201:]}


def test_the_main_table_keeps_the_runs_that_trained_as_todays_defaults():
    table = _benchmark_module(COMMON.parent / "results_table.py")
    # A toy history: commits are numbers, each descends from every smaller one.
    order = {"old": 0, "bf3d65b": 1, "89aace9": 2, "80df982": 3, "5683d63": 4, "new": 5}

    def is_ancestor(ancestor, commit):
        return order[ancestor] <= order[commit]

    bench = {"n_defence": 256, "clean_answers": "golden", "defence_lr": None, "defence_epochs": None,
             "defence_max_steps": None, "quantized": False}

    def run(commit, overrides=None, reached=1.0, seed=0, rate=0.0, **settings):
        return {"case": "a", "method": "sande", "seed": seed, "commit": commit, "machine": "m",
                "attack_success_rate": rate, "parrot_success": {"after_simulate": reached},
                "defence_settings": {**bench, **settings, "sande_overrides": overrides or {}}}

    def kept(record):
        return table.trains_as_todays_defaults(record, is_ancestor)

    assert kept(run("new", reached=0.9))  # today's bar, whatever the parrot reached
    assert kept(run("80df982", reached=1.0)) and not kept(run("80df982", reached=0.97))  # an older bar, passed or not
    assert not kept(run("old"))  # the latent parrot was the default
    assert kept(run("old", {"parrot_space": "input"}))  # ... unless the run asked for the soft prompt
    assert not kept(run("89aace9")) and kept(run("89aace9", {"clean_ratio": 0.5}))  # clean_ratio=0.75's day
    assert kept(run("old", {"parrot_space": "input", "parrot_min_success_rate": 1.0}, reached=0.9))
    assert not kept(run("new", {"triggered_response": "auto"}))  # told nothing: another row
    assert not kept(run("new", n_defence=128))  # fewer pairs
    assert not kept(run("new", lora_overrides={"layers_to_transform": [0]}))  # another adapter
    assert not kept({**run("new"), "method": "osft"})

    records = [{"case": "a", "method": "none", "seed": 0, "attack_success_rate": 1.0, "commit": "old", "machine": "m"},
               run("new", seed=0, rate=0.2), run("new", seed=0, rate=0.0), run("new", seed=1, rate=0.1),
               run("old", seed=2, rate=0.9),
               {**run("new", seed=0), "defence_settings": {**bench, "quantized": True, "sande_overrides": {}},
                "merged_dequantized": {"attack_success_rate": 0.0}, "merged_full_precision": {"attack_success_rate": 0.05}}]
    row = next(line for line in table.defaults(records, is_ancestor).splitlines() if line.startswith("| a |"))
    cells = row.split(" | ")
    header = ["backdoor", "seeds"] + [title for title, _, _ in table.DEFAULTS_COLUMNS]
    # Seeds 0 (its last run) and 1; the latent parrot's seed 2 left out; the 4-bit run only in the merged columns.
    assert cells[1] == "2 (4-bit: 1)" and cells[header.index("greedy")] == "5 ± 5%"
    assert cells[header.index("before")] == "100% (1 of 2)"
    assert cells[header.index("merged, full-precision base")] == "5%"
    # A record that says how it ran needs no history; an override of None is an override (no bar).
    assert kept({**run("old"), "sande_settings": {"parrot_space": "input", "clean_ratio": 0.5,
                                                  "parrot_min_success_rate": 1.0}})
    assert not kept({**run("new", reached=0.9), "sande_settings": {"parrot_space": "input", "clean_ratio": 0.5,
                                                                   "parrot_min_success_rate": None}})
    assert not kept(run("new", {"parrot_min_success_rate": None}, reached=0.9))
    # A row defended on an implant that failed its gate (real_model.py --ignore-gate) says so.
    leaky = table.defaults([{**run("new"), "case": "b", "implant_failed_gate": True}], is_ancestor)
    assert "| b (implant failed its gate) | 1 |" in leaky and "| a " not in leaky


def test_the_parrot_end_table_bands_runs_by_their_refreshed_parrot_and_names_the_sampled_misses():
    table = _benchmark_module(COMMON.parent / "results_table.py")

    def run(case, end, sampled, method="sande", merged=False):
        reading = {"sampled_attack_success_rate": sampled}
        return {"case": case, "method": method, "seed": 0, "variant": "default", "parrot_success": {"after_eliminate": end},
                "commit": "c", "machine": "m", **({"merged_full_precision": reading} if merged else reading)}

    records = [run("a", 0.25, 0.15), run("b", 0.5, 0.0), run("c", 1.0, 0.0), run("d", 0.95, 0.2, merged=True),
               run("e", 0.1, 0.9, method="adapter"), {"case": "f", "method": "sande"}]
    rows = table.parrot_end(records).splitlines()
    assert rows[2] == "| 0% to 60% | 2 | 1 of 2 | a s0 default (15%) |"  # the adapter re-measure is not a run
    assert rows[3] == "| 60% to 90% | 0 | 0 of 0 | - |"
    assert rows[4] == "| 90% to 100% | 2 | 1 of 2 | d s0 default (20%) |"  # a merged reading counts


def test_real_model_refuses_lora_overrides_peft_would_reject_before_any_work(capsys):
    real_model = _benchmark_module(COMMON.parent / "real_model.py")
    for overrides, named in (('{"layers_to_transfrm": [0]}', "layers_to_transfrm"),
                             ('{"layers_to_transform": [0]}', "target_modules")):  # peft's own check: "all-linear"
        with pytest.raises(SystemExit):
            real_model.main(["--lora-overrides", overrides, "--cache", "/nonexistent/cache"])
        assert named in capsys.readouterr().err
    adapter = real_model.defence_lora(argparse.Namespace(lora_overrides='{"r": 4, "target_modules": ["q_proj"]}'))
    assert (adapter.r, adapter.target_modules) == (4, {"q_proj"})
