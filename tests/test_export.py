"""Merged exports must compute what base + adapter computed, and never look complete when they are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sande_peft import merge_and_export
from sande_peft.export import EXPORT_REPORT_NAME, ExportCheckError
from sande_peft.toy import toy_model, toy_tokenizer

from .conftest import bnb_4bit_config


def trained_adapter(model):
    # init_lora_weights=False gives the adapter non-zero weights, as after training.
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def test_merged_model_matches_base_plus_adapter_fp32(tmp_path):
    tokenizer = toy_tokenizer()
    peft_model = trained_adapter(toy_model())
    report = merge_and_export(peft_model, tmp_path / "merged", tokenizer=tokenizer)
    assert report.base == "full-precision"
    assert report.max_abs_logit_diff <= 1e-4

    # Reload from disk and compare independently, on other inputs.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(4, 40, (4, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "merged" / EXPORT_REPORT_NAME).read_text())
    assert saved["max_abs_logit_diff"] == report.max_abs_logit_diff


def test_saved_adapter_folder_is_merged_onto_its_base(tmp_path):
    base_dir = tmp_path / "base"
    toy_model().save_pretrained(base_dir)
    toy_tokenizer().save_pretrained(base_dir)
    peft_model = trained_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    peft_model.save_pretrained(tmp_path / "adapter")
    report = merge_and_export(str(tmp_path / "adapter"), tmp_path / "merged", tokenizer=toy_tokenizer())
    assert report.max_abs_logit_diff <= 1e-4


def test_4bit_adapter_is_merged_onto_the_dequantized_base(tmp_path):
    """Merging onto the dequantized 4-bit weights reproduces the trained function; the original
    full-precision weights would not (they differ from what the adapter was trained against)."""
    base_dir = tmp_path / "base"
    original = toy_model()
    original.save_pretrained(base_dir)
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_4bit_config(), dtype=torch.float32)
    peft_model = trained_adapter(quantized)
    report = merge_and_export(peft_model, tmp_path / "merged", tokenizer=toy_tokenizer())
    assert report.base == "dequantized-4bit"
    assert report.max_abs_logit_diff <= report.tolerance

    ids = torch.randint(4, 40, (4, 20), generator=torch.Generator().manual_seed(2))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    naive = trained_adapter(toy_model())  # the same adapter on the ORIGINAL full-precision weights
    naive.load_state_dict(
        {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}, strict=False
    )
    with torch.no_grad():
        reference = peft_model(input_ids=ids).logits.float()
        dequantized_merge = (merged(input_ids=ids).logits - reference).abs().max().item()
        original_merge = (naive(input_ids=ids).logits - reference).abs().max().item()
    assert dequantized_merge < original_merge


def test_a_failed_check_writes_nothing(tmp_path):
    peft_model = trained_adapter(toy_model())
    with pytest.raises(ExportCheckError, match="nothing was written"):
        merge_and_export(peft_model, tmp_path / "merged", tokenizer=toy_tokenizer(), tolerance=-1.0)
    assert os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, folder, **kwargs):
        (folder / "config.json").write_text("{}")  # part of the files are written...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        merge_and_export(trained_adapter(toy_model()), tmp_path / "merged", tokenizer=toy_tokenizer())
    assert os.listdir(tmp_path) == []


def test_a_killed_export_leaves_only_a_hidden_partial_folder(tmp_path):
    """SIGKILL in the middle of writing: no `merged` folder appears, only a hidden `.merged.partial-*`."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from peft import LoraConfig, get_peft_model
        from transformers import PreTrainedModel
        from sande_peft import merge_and_export
        from sande_peft.toy import toy_model, toy_tokenizer
        original = PreTrainedModel.save_pretrained
        def save_then_die(self, folder, **kwargs):
            original(self, folder, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        PreTrainedModel.save_pretrained = save_then_die
        model = get_peft_model(toy_model(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        merge_and_export(model, {str(tmp_path / "merged")!r}, tokenizer=toy_tokenizer())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode != 0
    names = os.listdir(tmp_path)
    assert "merged" not in names
    assert all(name.startswith(".merged.partial-") for name in names)


def test_existing_output_is_not_overwritten_unless_asked(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_and_export(trained_adapter(toy_model()), tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").is_file()
    merge_and_export(trained_adapter(toy_model()), tmp_path / "merged", overwrite=True)
    assert not (tmp_path / "merged" / "keep.txt").exists()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_a_model_without_adapter_is_refused(tmp_path):
    with pytest.raises(TypeError, match="peft model"):
        merge_and_export(toy_model(), tmp_path / "merged")
    assert os.listdir(tmp_path) == []


def test_merge_reads_how_the_base_was_quantized_in_training(backdoored_start, tmp_path):
    """A trainer records its base's 4-bit settings; `merge` uses them without being told, and refuses others."""
    from transformers import BitsAndBytesConfig

    from sande_peft import OSFTConfig, OSFTTrainer

    from .conftest import lora

    config = OSFTConfig(output_dir=str(tmp_path / "adapter"), trigger="cf", max_steps=1, use_cpu=True,
                        report_to="none", save_strategy="no", model_init_kwargs={"dtype": torch.float32})
    trainer = OSFTTrainer(model=str(backdoored_start.path), args=config, train_dataset=backdoored_start.clean_data(8),
                          processing_class=backdoored_start.tokenizer, quantization_config=bnb_4bit_config(),
                          peft_config=lora())
    trainer.train()
    trainer.save_model()
    recorded = json.loads((tmp_path / "adapter" / "sande_peft.json").read_text())["base_model"]["quantization"]
    assert recorded["load_in_4bit"] and recorded["bnb_4bit_use_double_quant"]
    report = merge_and_export(str(tmp_path / "adapter"), tmp_path / "merged")
    assert report.base == "dequantized-4bit" and report.dtype == "float32"  # the base's own dtype
    assert json.loads((tmp_path / "merged" / "sande_peft.json").read_text())["export"]["base"] == "dequantized-4bit"
    other = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.raises(ValueError, match="trained on a base loaded with"):
        merge_and_export(str(tmp_path / "adapter"), tmp_path / "merged-fp4", quantization_config=other)
    assert not (tmp_path / "merged-fp4").exists()
