"""Utility measured where training cannot flatter it: how far a defended model drifted from a reference.

A fine-tune lowers the NLL of answers like the ones it trained on, so the NLL of a dataset's
gold answers cannot show the damage a defence did. The reference here is a model's OWN
behaviour: the suspect model (a defender always has it) or, where it exists, the original
clean model, answering prompts that do not come from the defence data.

1. [`reference_answers`] runs the reference once: its greedy answers to the prompts, and its
   next-token distribution over every answer token (the ``top_k`` most likely tokens and the
   mass of the rest), small enough to keep on disk;
2. [`model_drift`] measures any model against it: the mean per-token KL(reference || model)
   over the reference's answers, the NLL of those answers, and how often the model's own
   greedy answer agrees with the reference's on its first ``agreement_tokens`` tokens.

The KL over the top-k tokens and one bucket for the rest is a lower bound of the full KL
(grouping outcomes never increases a divergence); with ``top_k=64`` it keeps nearly all of it.

>>> from sande_peft.toy import toy_model, toy_tokenizer
>>> tok, prompts = toy_tokenizer(), [[{"role": "user", "content": "w1 w2"}], [{"role": "user", "content": "w3"}]]
>>> reference = reference_answers(toy_model(seed=0), tok, prompts, max_new_tokens=4)
>>> same, other = model_drift(toy_model(seed=0), tok, reference), model_drift(toy_model(seed=1), tok, reference)
>>> round(same.kl, 6), same.agreement, other.kl > 0.01
(0.0, 1.0, True)
>>> round(defence_score(utility=0.9, attack_success=0.05), 3)  # sqrt(90 x 95), as the Anti-BAD challenge scores
92.466
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..parrot import Parrot
from ..tokenization import choose_boundary, encode_pair, encode_prompt, insert_slots, mark_whole_prompt
from .generation import _pad_id, generate_texts

DRIFT_ANSWER_TOKENS = 64
AGREEMENT_TOKENS = 32
# Bumped whenever the way answers are tokenized or scored changes, so a saved reference from an
# older version is refused rather than compared token by token against a different tokenization.
REFERENCE_FORMAT = 2


@dataclass
class ReferenceAnswers:
    """A reference model's greedy answers and, per answer token, its ``top_k`` log-probabilities and the rest's mass."""

    prompts: list
    answers: list[str]
    answer_ids: list[list[int]]  # the answers' tokens, as the trainers tokenize them after their prompts
    top_ids: list[list[list[int]]]  # [prompt][answer token][k]
    top_logprobs: list[list[list[float]]]
    rest_logprob: list[list[float]]  # log of the probability mass outside the top k
    max_new_tokens: int  # the answers' budget
    format: int = REFERENCE_FORMAT

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceAnswers:
        with open(path) as f:
            fields = json.load(f)
        if fields.get("format") != REFERENCE_FORMAT:
            raise ValueError(
                f"{path} was saved by an older sande-peft (reference format {fields.get('format', 1)}, this version "
                f"reads {REFERENCE_FORMAT}): make it again with `reference_answers(model, tokenizer, prompts)`."
            )
        return cls(**fields)


@dataclass
class DriftReport:
    """How far a model is from a reference on the reference's own answers (see the module's docs).

    Attributes:
        kl: mean per-token KL(reference || model) over the answer tokens, in nats.
        nll: mean per-token NLL of the reference's answers under the model.
        agreement: share of prompts whose greedy answers agree on the first ``agreement_tokens`` tokens.
    """

    kl: float
    nll: float
    agreement: float
    n_prompts: int
    n_tokens: int
    agreement_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _as_conversation(prompt, answer):
    """An answer in the prompt's format: a text answer to a conversation becomes an assistant turn."""
    return [{"role": "assistant", "content": answer}] if isinstance(prompt, list) and isinstance(answer, str) else answer


def answer_text(answer) -> str:
    """The text of an answer given as a string or as assistant turns."""
    return answer if isinstance(answer, str) else " ".join(m["content"] for m in answer if m.get("role") == "assistant")


def _batches(n: int, size: int):
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: Sequence, answers: Sequence, batch_size: int, text_only: bool = False,
                    parrot: Parrot | None = None, seed: int = 0):
    """Per prompt: the answer's token ids and the model's log-probabilities at each of them (a list of tensors).

    ``text_only``: only the tokens of the answer's text, not the end of turn the chat template
    closes it with (a generated answer cut by its token budget did not end there).
    ``parrot``: the prompts carry it as generation gives it to them (a latent one on every prompt
    token; an input-space one at its position, random places drawn from ``seed``).
    """
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in _batches(len(prompts), batch_size):
            pairs = [encode_pair(tokenizer, prompts[i], _as_conversation(prompts[i], answers[i]),
                                 known_completion_prefix=answer_text(answers[i]) if text_only and answers[i] else None)
                     for i in batch]
            prompt_rows, marks = [p.prompt_ids for p in pairs], [[-1] * len(p.prompt_ids) for p in pairs]
            if parrot is not None:
                prompt_rows, marks = zip(*(_with_parrot(tokenizer, prompts[i], parrot, pad, rng) for i in batch))
            rows = [ids + p.completion_ids for ids, p in zip(prompt_rows, pairs, strict=True)]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            parrot_index = torch.tensor([m + [-1] * (width - len(m)) for m in marks], device=device)
            logprobs = _forward(model, input_ids, attention, parrot, parrot_index).logits.float().log_softmax(-1).cpu()
            for row, (ids, pair) in enumerate(zip(prompt_rows, pairs, strict=True)):
                n = pair.target_length if text_only else len(pair.completion_ids)
                start = len(ids)
                out.append((pair.completion_ids[:n], logprobs[row, start - 1 : start + n - 1]))  # t predicts t + 1
    finally:
        model.train(was_training)
    return out


def _with_parrot(tokenizer, prompt, parrot: Parrot, pad: int, rng) -> tuple[list[int], list[int]]:
    """A prompt's ids and parrot index, as `generate_texts` builds them."""
    ids, boundaries = encode_prompt(tokenizer, prompt)
    if parrot.is_latent:
        return ids, mark_whole_prompt(ids)
    return insert_slots(ids, choose_boundary(boundaries, parrot.config.position, rng), parrot.num_vectors, pad)


def _forward(model, input_ids, attention_mask, parrot: Parrot | None, parrot_index):
    if parrot is None:
        return model(input_ids=input_ids, attention_mask=attention_mask)
    if parrot.is_latent:
        with parrot.steer(model, parrot_index):
            return model(input_ids=input_ids, attention_mask=attention_mask)
    return model(inputs_embeds=parrot.embed(model, input_ids, parrot_index), attention_mask=attention_mask)


def reference_answers(
    model, tokenizer, prompts: Sequence, *, max_new_tokens: int = DRIFT_ANSWER_TOKENS, top_k: int = 64,
    batch_size: int = 16,
) -> ReferenceAnswers:
    """Run the reference model once: its greedy answers to ``prompts`` and its distribution over their tokens."""
    prompts = list(prompts)
    answers = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ids, top_ids, top_lp, rest = [], [], [], []
    for completion_ids, logprobs in answer_logprobs(model, tokenizer, prompts, answers, batch_size, text_only=True):
        values, indices = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        mass = values.exp().sum(-1).clamp(max=1 - 1e-7)
        ids.append(list(completion_ids))
        top_ids.append(indices.tolist())
        top_lp.append(values.tolist())
        rest.append(torch.log1p(-mass).tolist())
    return ReferenceAnswers(prompts, answers, ids, top_ids, top_lp, rest, max_new_tokens)


def _first_tokens(tokenizer, text: str, n: int) -> list[int]:
    return getattr(tokenizer, "tokenizer", tokenizer)(text, add_special_tokens=False)["input_ids"][:n]


def model_drift(
    model, tokenizer, reference: ReferenceAnswers, *, agreement_tokens: int = AGREEMENT_TOKENS, batch_size: int = 16,
    answers: Sequence[str] | None = None,
) -> DriftReport:
    """KL, NLL and greedy agreement of ``model`` against ``reference`` (see the module's docs).

    ``answers``: the model's own greedy answers to ``reference.prompts``, if already generated
    (with at least as many new tokens as compared); else they are generated here. Agreement
    compares the first ``agreement_tokens`` tokens, or fewer if the reference's budget was smaller.
    """
    agreement_tokens = min(agreement_tokens, reference.max_new_tokens)
    kl_sum, nll_sum, n_tokens = 0.0, 0.0, 0
    scored = answer_logprobs(model, tokenizer, reference.prompts, reference.answers, batch_size, text_only=True)
    for i, (completion_ids, logprobs) in enumerate(scored):
        if list(completion_ids) != reference.answer_ids[i]:
            raise ValueError("The reference was tokenized differently: use the tokenizer it was made with.")
        if not completion_ids:
            continue
        top_ids = torch.tensor(reference.top_ids[i])
        ref_top = torch.tensor(reference.top_logprobs[i])
        ref_rest = torch.tensor(reference.rest_logprob[i])
        model_top = logprobs.gather(-1, top_ids)
        model_rest = torch.log1p(-model_top.exp().sum(-1).clamp(max=1 - 1e-7))
        kl = (ref_top.exp() * (ref_top - model_top)).sum(-1) + ref_rest.exp() * (ref_rest - model_rest)
        kl_sum += kl.clamp(min=0).sum().item()
        nll_sum += -logprobs.gather(-1, torch.tensor(completion_ids)[:, None]).sum().item()
        n_tokens += len(completion_ids)
    if answers is None:
        answers = generate_texts(model, tokenizer, reference.prompts, max_new_tokens=agreement_tokens,
                                 batch_size=batch_size)
    agree = [
        _first_tokens(tokenizer, a, agreement_tokens) == _first_tokens(tokenizer, r, agreement_tokens)
        for a, r in zip(answers, reference.answers, strict=True)
    ]
    return DriftReport(kl=kl_sum / max(n_tokens, 1), nll=nll_sum / max(n_tokens, 1), agreement=sum(agree) / len(agree),
                       n_prompts=len(agree), n_tokens=n_tokens, agreement_tokens=agreement_tokens)


def defence_score(utility: float, attack_success: float) -> float:
    """One figure per defended model: sqrt(utility x (100 - attack success)), both in percent (0 to 100).

    The Anti-BAD challenge (IEEE SaTML 2026) scores defences this way: removal bought with
    utility does not count. ``utility`` and ``attack_success`` are fractions in [0, 1].
    """
    if not (0 <= utility <= 1 and 0 <= attack_success <= 1):
        raise ValueError(f"utility and attack success are fractions in [0, 1], got {utility} and {attack_success}.")
    return math.sqrt(100 * utility * 100 * (1 - attack_success))
