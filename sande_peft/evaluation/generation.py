"""Batched generation with left padding, greedy or sampled, optionally with a parrot in every prompt.

Works on any causal LM (4-bit and peft models included). Prompts are tokenized exactly as
the trainers tokenize them, so what is measured is what was trained.

- [`generate_texts`]: one greedy answer per prompt;
- [`sample_texts`]: ``Sampling.num_samples`` sampled answers per prompt (temperature, top-p), seeded;
- both take ``max_new_tokens`` as one number or a budget per prompt (see
  [`sande_peft.evaluation.backdoor.answer_budgets`]).

>>> from sande_peft.toy import toy_model, toy_tokenizer
>>> outputs = generate_texts(toy_model(), toy_tokenizer(), [[{"role": "user", "content": "w1 w2"}]], max_new_tokens=3)
>>> len(outputs), type(outputs[0]).__name__
(1, 'str')
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig

from ..bnb_compat import restore_trainable_4bit_layout
from ..parrot import Parrot
from ..tokenization import choose_boundary, encode_prompt, insert_slots, mark_whole_prompt, prompt_token_ids


def _pad_id(tokenizer) -> int:
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token`.")
    return pad


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers, but stay safe
        return iterable
    return tqdm(iterable, desc=desc)


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: ``num_samples`` answers per prompt at ``temperature`` and nucleus ``top_p``.

    BackdoorLLM's evaluation decodes with top-p 0.75. ``seed`` makes the draws repeatable on
    the same machine.
    """

    num_samples: int = 3
    temperature: float = 1.0
    top_p: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling needs num_samples >= 1, temperature > 0 and top_p in (0, 1]; got {self}.")

    def to_dict(self) -> dict:
        return asdict(self)


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(b < 1 for b in budgets):
        raise ValueError(f"`max_new_tokens` must be a positive number or one per prompt ({n}), got {max_new_tokens!r}.")
    return budgets


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int | Sequence[int] = 32,
    batch_size: int = 16,
    parrot: Parrot | None = None,
    parrot_position: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``prompts``, one string each, special tokens removed.

    Args:
        max_new_tokens: one budget for every prompt, or one per prompt (a batch generates up
            to the largest of its prompts' budgets; prompts of similar length share a batch).
        parrot: if given, its vectors are inserted into each prompt at ``parrot_position``
            (``"start"``, ``"end"`` or ``"random"``; default: the position it was trained at);
            a latent parrot is added to the hidden states of every prompt token.
        seed: draws the random parrot positions.
    """
    answers = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, parrot, parrot_position, seed, progress,
                        sampling=None)
    return [a[0] for a in answers]


@torch.no_grad()
def sample_texts(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    sampling: Sampling,
    *,
    max_new_tokens: int | Sequence[int] = 32,
    batch_size: int = 16,
    parrot: Parrot | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """``sampling.num_samples`` sampled answers to each of ``prompts`` (a list per prompt), seeded by ``sampling.seed``.

    >>> from sande_peft.toy import toy_model, toy_tokenizer
    >>> answers = sample_texts(toy_model(), toy_tokenizer(), [[{"role": "user", "content": "w1"}]], Sampling(num_samples=2),
    ...                        max_new_tokens=3)
    >>> len(answers), len(answers[0])
    (1, 2)
    """
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, parrot, None, sampling.seed, progress,
                     sampling=sampling)


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, parrot, parrot_position, seed, progress, sampling):
    if len(prompts) == 0:
        return []
    budgets = _budgets(max_new_tokens, len(prompts))
    pad_id = _pad_id(tokenizer)
    rng = random.Random(seed)
    position = parrot_position or (parrot.config.position if parrot is not None else None)
    rows, indices = [], []
    for prompt in prompts:
        if parrot is None:
            rows.append(prompt_token_ids(tokenizer, prompt))
        else:
            ids, boundaries = encode_prompt(tokenizer, prompt)
            if parrot.is_latent:
                index = mark_whole_prompt(ids)
            else:
                ids, index = insert_slots(ids, choose_boundary(boundaries, position, rng), parrot.num_vectors, pad_id)
            rows.append(ids)
            indices.append(index)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    decoding = dict(do_sample=False) if sampling is None else dict(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
        num_return_sequences=sampling.num_samples,
    )
    n_out = 1 if sampling is None else sampling.num_samples
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch: less padding
    outputs: list[list[str]] = [[] for _ in rows]
    decoder = getattr(tokenizer, "tokenizer", tokenizer)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if sampling is not None:
        torch.manual_seed(sampling.seed)
    try:
        for batch in _progress(batches, progress, "Generating"):
            config = GenerationConfig(max_new_tokens=max(budgets[i] for i in batch), pad_token_id=pad_id,
                                      eos_token_id=_eos_ids(model, tokenizer), **decoding)
            input_ids = _left_pad([rows[i] for i in batch], pad_id).to(device)
            attention_mask = _left_pad([[1] * len(rows[i]) for i in batch], 0).to(device)
            if parrot is None or parrot.is_latent:
                steering = nullcontext()
                if parrot is not None:  # latent: added to the hidden states by a hook, the ids stay as they are
                    marks = _left_pad([indices[i] for i in batch], -1).to(device)
                    # generate() repeats each prompt num_return_sequences times, one after the other
                    steering = parrot.steer(model, marks.repeat_interleave(n_out, dim=0))
                with steering:
                    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                new_tokens = generated[:, input_ids.shape[1] :]
            else:
                parrot_index = _left_pad([indices[i] for i in batch], -1).to(device)
                embeds = parrot.embed(model, input_ids, parrot_index)
                # With `inputs_embeds` only, decoder-only models return the new tokens alone.
                new_tokens = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config)
            for k, tokens in enumerate(new_tokens):  # num_return_sequences answers per prompt, in order
                i = batch[k // n_out]
                outputs[i].append(decoder.decode(tokens[: budgets[i]], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
        if was_training:  # evaluated in the middle of training: keep 4-bit CPU layers trainable
            restore_trainable_4bit_layout(model)
    return outputs


def answer_pairs(
    model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 128, batch_size: int = 32, progress: bool = True
):
    """Prompt/completion pairs whose answers are the model's own greedy answers to ``prompts``.

    For a defender with prompts but no trusted answers: a backdoored model behaves normally
    without its trigger, so its answers to clean prompts are clean (though a model that
    repeats the instruction passes that habit on; see docs/concepts.md).

    >>> from sande_peft.toy import toy_model, toy_tokenizer
    >>> model, tokenizer, prompts = toy_model(), toy_tokenizer(), [[{"role": "user", "content": "w1 w2"}]]
    >>> pairs = answer_pairs(model, tokenizer, prompts, max_new_tokens=3, progress=False)
    >>> pairs.column_names, pairs[0]["completion"][0]["role"]
    (['prompt', 'completion'], 'assistant')
    >>> pairs[0]["completion"][0]["content"] == generate_texts(model, tokenizer, prompts, max_new_tokens=3)[0]
    True
    """
    from datasets import Dataset

    answers = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return Dataset.from_list(
        [{"prompt": p, "completion": [{"role": "assistant", "content": a}]} for p, a in zip(prompts, answers, strict=True)]
    )
