"""Suppressed is not removed: does the backdoor come back after a little benign fine-tuning?

A defence that only hides a behaviour lets it return once the model is fine-tuned again on
ordinary data. [`refinetune`] is that stress: a plain LoRA SFT (trl's `SFTTrainer`) of the
defended model on benign pairs the defence never saw, merged into a new model, which is then
measured like any other.

    stressed = refinetune(cleaned_model, tokenizer, other_benign_pairs, max_steps=100)
    evaluate_backdoor(stressed, tokenizer, prompts, trigger=..., triggered_response=...)
"""

from __future__ import annotations

import copy
import tempfile


def _restore_class_forwards(model):
    """Give every module of ``model`` its class's ``forward`` back where trl's fused LM head replaced it.

    trl's `add_fused_lm_head` (run by every `SFTTrainer`) sets an instance ``forward`` that closes over the
    patched model's own bound ``forward``. A deepcopy keeps that closure, so the copy would generate with the
    ORIGINAL's weights while training its own: a re-fine-tune measured that way shows the model it started from.
    """
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(getattr(forward, "__func__", None), "__wrapped__", None) is type(module).forward:
            del module.forward
    return model


def _merged_copy(model):
    """A full-precision copy of ``model`` with any adapter merged in; the caller's model is left as it is."""
    from peft import PeftModel

    copied = copy.deepcopy(model)
    return _restore_class_forwards(copied.merge_and_unload() if isinstance(model, PeftModel) else copied)


def refinetune(
    model,
    tokenizer,
    pairs,
    *,
    max_steps: int = 100,
    learning_rate: float = 2e-4,
    per_device_train_batch_size: int = 8,
    lora_r: int = 16,
    max_length: int | None = 256,
    seed: int = 0,
    use_cpu: bool | None = None,
):
    """A benign LoRA fine-tune of ``model`` (an adapter is merged first), merged: the model a user would get
    by fine-tuning the cleaned model on ``pairs`` (prompt/completion or messages records).

    The defaults are an ordinary SFT: 100 steps of batch 8 at 2e-4, LoRA r=16 on all linear layers.
    """
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    base = _merged_copy(model)
    use_cpu = (not torch.cuda.is_available()) if use_cpu is None else use_cpu
    with tempfile.TemporaryDirectory(prefix="sande-refinetune-") as out:
        config = SFTConfig(
            output_dir=out, max_steps=max_steps, learning_rate=learning_rate,
            per_device_train_batch_size=per_device_train_batch_size, max_length=max_length, seed=seed,
            save_strategy="no", report_to="none", logging_steps=max(1, max_steps // 5), use_cpu=use_cpu,
            bf16=False if use_cpu else None, gradient_checkpointing=False, activation_checkpointing=False,
            disable_tqdm=True,
        )
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear")
        trainer = SFTTrainer(model=base, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
        trainer.train()
        stressed = trainer.model.merge_and_unload()
    return stressed.eval()
