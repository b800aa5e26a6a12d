"""OSFT on toy backdoored models: it must remove the backdoor, keep the task, and beat plain SFT."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from sande_peft import OSFTConfig, OSFTTrainer
from sande_peft.checks import NotACausalLMError
from sande_peft.data import DatasetFormatError

from .conftest import bnb_4bit_config, lora

OSFT_STEPS = dict(max_steps=200, learning_rate=2e-3)


def osft(backdoored, cpu_args, **overrides):
    config = OSFTConfig(trigger="cf", **{**cpu_args, **OSFT_STEPS, **overrides})
    trainer = OSFTTrainer(
        model=backdoored.fresh_model(),
        args=config,
        train_dataset=backdoored.clean_data(),
        processing_class=backdoored.tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("fixture", ["backdoored_start", "backdoored_random"])
def test_osft_removes_the_backdoor_and_beats_plain_sft(fixture, request, cpu_args):
    backdoored = request.getfixturevalue(fixture)
    before = backdoored.measure(backdoored.model)
    assert before.attack_success_rate >= 0.9

    after = backdoored.measure(osft(backdoored, cpu_args).model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05

    # Plain SFT: the same clean data (twice, as OSFT sees each example twice), the same steps.
    clean = backdoored.clean_data()
    sft = SFTTrainer(
        model=backdoored.fresh_model(),
        args=SFTConfig(**{**cpu_args, **OSFT_STEPS}),
        train_dataset=clean,
        processing_class=backdoored.tokenizer,
        peft_config=lora(),
    )
    sft.train()
    contrast = backdoored.measure(sft.model)
    assert contrast.attack_success_rate >= 0.8
    assert after.attack_success_rate < contrast.attack_success_rate - 0.7


def test_osft_4bit_qlora_path(backdoored_start, cpu_args):
    """The model given as a path with a 4-bit quantization_config: QLoRA on CPU bitsandbytes."""
    before = backdoored_start.measure(backdoored_start.model)
    config = OSFTConfig(trigger="cf", model_init_kwargs={"dtype": "float32"}, **{**cpu_args, **OSFT_STEPS})
    trainer = OSFTTrainer(
        model=str(backdoored_start.path),
        args=config,
        train_dataset=backdoored_start.clean_data(),
        processing_class=backdoored_start.tokenizer,
        peft_config=lora(),
        quantization_config=bnb_4bit_config(),
    )
    assert trainer.model.get_base_model().is_loaded_in_4bit
    trainer.train()
    after = backdoored_start.measure(trainer.model)
    assert after.attack_success_rate <= 0.05
    assert after.clean_exact_match >= before.clean_exact_match - 0.05


def test_clean_pairs_keep_utility(backdoored_random, cpu_args):
    """The measured lesson behind the default: triggered pairs alone cost clean accuracy."""
    with_clean = backdoored_random.measure(osft(backdoored_random, cpu_args).model)
    without = backdoored_random.measure(osft(backdoored_random, cpu_args, clean_ratio=0.0).model)
    assert with_clean.clean_exact_match > without.clean_exact_match


def test_osft_pairs_and_completion_only_loss(backdoored_start, cpu_args):
    config = OSFTConfig(trigger=["cf", "mn"], trigger_position="end", max_steps=1, **cpu_args)
    clean = backdoored_start.clean_data(40)
    trainer = OSFTTrainer(
        model=backdoored_start.fresh_model(), args=config, train_dataset=clean,
        processing_class=backdoored_start.tokenizer, peft_config=lora(),
    )
    texts = [p[0]["content"] for p in trainer.osft_dataset["prompt"]]
    triggered = [t for t in texts if t.split()[-1] in ("cf", "mn")]
    assert len(trainer.osft_dataset) == 80 and len(triggered) == 40
    assert sum(t.endswith("cf") for t in triggered) == 20  # each trigger equally often
    # Loss on the completion only: every prompt token is masked.
    tok = backdoored_start.tokenizer
    assistant = tok.convert_tokens_to_ids("assistant")
    for example in trainer.train_dataset.select(range(10)):
        ids, labels = example["input_ids"], example["labels"]
        start = ids.index(assistant) + 2  # 'assistant', ':'
        assert all(label == -100 for label in labels[:start])
        assert labels[start:] == ids[start:]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({}, ValueError, "OSFT needs the trigger"),
        ({"trigger": ""}, ValueError, "empty trigger"),
        ({"trigger": ["cf", " "]}, ValueError, "empty trigger"),
        ({"trigger": "cf", "clean_ratio": 1.5}, ValueError, "must lie in \\[0, 1\\]"),
        ({"trigger": "cf", "clean_ratio": -0.1}, ValueError, "must lie in \\[0, 1\\]"),
        ({"trigger": "cf", "trigger_position": "middle"}, ValueError, "trigger_position"),
        ({"trigger": ["cf", "mn"], "trigger_combine": "both"}, ValueError, "trigger_combine"),
    ],
)
def test_bad_config_fails_before_anything_is_written(overrides, error, match, tmp_path):
    with pytest.raises(error, match=match):
        OSFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, **overrides)
    assert not (tmp_path / "out").exists()


def _trainer(backdoored, tmp_path, **kwargs):
    config = kwargs.pop("args", None) or OSFTConfig(
        output_dir=str(tmp_path / "out"), trigger="cf", use_cpu=True, report_to="none", max_steps=1
    )
    defaults = dict(
        model=backdoored.fresh_model(), args=config, train_dataset=backdoored.clean_data(8),
        processing_class=backdoored.tokenizer, peft_config=lora(),
    )
    return OSFTTrainer(**{**defaults, **kwargs})


def test_bad_inputs_to_the_trainer_fail_before_anything_is_written(backdoored_start, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DatasetFormatError, match="no prompt and answer"):
        _trainer(backdoored_start, tmp_path, train_dataset=Dataset.from_list([{"text": "w1 w2"}]))
    with pytest.raises(DatasetFormatError, match="empty"):
        _trainer(backdoored_start, tmp_path, train_dataset=Dataset.from_list([]))
    long_trigger = " ".join(["cf"] * 40)
    with pytest.raises(ValueError, match="cannot fit `max_length=32`"):
        _trainer(
            backdoored_start, tmp_path,
            args=OSFTConfig(output_dir=str(out), trigger=long_trigger, max_length=32, use_cpu=True, report_to="none"),
        )
    # three triggers that each fit, but not all together: counted together when the backdoor needs them all
    parts = [" ".join([w] * 8) for w in ("cf", "mn", "bb")]
    fits = OSFTConfig(output_dir=str(tmp_path / "fits"), trigger=parts, max_length=32, use_cpu=True, report_to="none", max_steps=1)
    assert _trainer(backdoored_start, tmp_path, args=fits).osft_dataset.num_rows == 16
    with pytest.raises(ValueError, match="cannot fit `max_length=32`"):
        _trainer(backdoored_start, tmp_path, args=OSFTConfig(
            output_dir=str(out), trigger=parts, trigger_combine="all", max_length=32, use_cpu=True, report_to="none"))
    from transformers import BertConfig, BertForSequenceClassification

    classifier = BertForSequenceClassification(
        BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(NotACausalLMError, match="not a causal language model"):
        _trainer(backdoored_start, tmp_path, model=classifier)
    with pytest.raises(TypeError, match="OSFTConfig"):
        _trainer(backdoored_start, tmp_path, args=SFTConfig(output_dir=str(out), use_cpu=True))
    assert not out.exists()


def test_a_non_causal_checkpoint_path_is_rejected_before_loading(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(path)
    with pytest.raises(NotACausalLMError, match="BertForMaskedLM"):
        OSFTTrainer(
            model=str(path),
            args=OSFTConfig(output_dir=str(tmp_path / "out"), trigger="cf", use_cpu=True),
            train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]),
        )
    assert not (tmp_path / "out").exists()


def test_every_format_is_accepted(backdoored_start, tmp_path):
    """Plain strings and `messages` conversations give the same kind of triggered pairs."""
    plain = Dataset.from_list([{"prompt": "w1 w2 w3", "completion": " w4 w5 w6"}] * 4)
    trainer = _trainer(backdoored_start, tmp_path, train_dataset=plain)
    assert sorted(set(trainer.osft_dataset["prompt"]))[0].count("cf") in (0, 1)
    assert any("cf" in p.split() for p in trainer.osft_dataset["prompt"])
    messages = Dataset.from_list(
        [{"messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"},
                       {"role": "assistant", "content": "w3 w4"}]}] * 4
    )
    trainer = _trainer(backdoored_start, tmp_path, train_dataset=messages)
    prompts = trainer.osft_dataset["prompt"]
    assert all(p[0] == {"role": "system", "content": "w9"} for p in prompts)  # the trigger never goes there
    assert any("cf" in p[1]["content"].split() for p in prompts)
    assert all(c == [{"role": "assistant", "content": "w3 w4"}] for c in trainer.osft_dataset["completion"])
    assert torch.is_tensor(torch.tensor(trainer.train_dataset[0]["input_ids"]))
