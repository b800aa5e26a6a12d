"""The suspect model's own next-token distributions: what elimination trains toward by default.

With `eliminate_loss_type="distill"`, an elimination row does not learn a dataset's answer: it
learns to predict, at every answer token, what the SUSPECT model predicts there without the
parrot. "With the parrot, behave exactly as without it": the backdoor's path closes, and the
rest of the model has nothing to move toward but itself, so clean behaviour is kept (a
dataset's answers would pull it toward their style).

The suspect is the model with its adapter off, before training. Its distributions are
computed once, when training starts, over the exact token sequences elimination trains on
(the clean pair, or the clean pair after an echo of the prompt), and kept as the ``top_k``
most likely tokens per position plus the mass of the rest. The loss is the KL divergence
over those ``top_k + 1`` outcomes ([`distill_loss`]).

>>> import torch
>>> targets = TeacherTargets(top_k=2)
>>> targets.add(key=0, logprobs=torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])))
>>> ids, logprobs, rest = targets.gather([0], [1])  # the first answer token of row key 0
>>> ids.tolist(), [round(v, 2) for v in logprobs.exp()[0].tolist()], round(rest.exp().item(), 2)
([[0, 1]], [0.7, 0.2], 0.1)
>>> same = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
>>> round(distill_loss(same, ids, logprobs, rest).item(), 6)  # no divergence from itself
0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Tokens kept per position; the rest of the distribution is one bucket.
TEACHER_TOP_K = 64


def teacher_key(index: int, echo: bool) -> int:
    """The key of example ``index``'s elimination sequence, plain or after an echo of the prompt."""
    return 2 * index + int(echo)


class TeacherTargets:
    """Per sequence key: the teacher's ``top_k`` token ids and log-probabilities at each answer position, and
    the log of the mass outside them."""

    def __init__(self, top_k: int = TEACHER_TOP_K):
        self.top_k = top_k
        self._ids: dict[int, torch.Tensor] = {}
        self._logprobs: dict[int, torch.Tensor] = {}
        self._rest: dict[int, torch.Tensor] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._ids

    def add(self, key: int, logprobs: torch.Tensor) -> None:
        """Keep the teacher's log-probabilities ``logprobs`` (answer positions x vocabulary) of sequence ``key``."""
        values, ids = logprobs.float().topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        self._ids[key] = ids.cpu()
        self._logprobs[key] = values.cpu()
        self._rest[key] = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-6)).cpu()

    def gather(self, keys: Sequence[int], counts: Sequence[int]):
        """The targets of the first ``counts[r]`` answer tokens of each row ``r``, concatenated row after row."""
        parts = [(self._ids[k][:n], self._logprobs[k][:n], self._rest[k][:n]) for k, n in zip(keys, counts, strict=True)]
        if any(len(p[0]) < n for p, n in zip(parts, counts, strict=True)):
            raise RuntimeError("A training row has more answer tokens than its teacher targets: rebuild them.")
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def distill_loss(logprobs: torch.Tensor, ids: torch.Tensor, target_logprobs: torch.Tensor,
                 target_rest: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || model) over the teacher's top-k tokens and one bucket for the rest.

    ``logprobs``: the model's log-probabilities at the answer positions (positions x vocabulary).
    """
    ids = ids.to(logprobs.device)
    target_logprobs = target_logprobs.to(logprobs.device)
    target_rest = target_rest.to(logprobs.device)
    model_top = logprobs.gather(-1, ids)
    model_rest = torch.log1p(-model_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (target_logprobs.exp() * (target_logprobs - model_top)).sum(-1)
    return kl + target_rest.exp() * (target_rest - model_rest)


@torch.no_grad()
def compute_teacher_targets(model, rows: dict[int, dict], pad_token_id: int, batch_size: int = 8,
                            top_k: int = TEACHER_TOP_K) -> TeacherTargets:
    """Run ``model`` (the suspect: its adapter off) over ``rows`` (key -> ``input_ids``/``labels``) and keep its
    distributions at the labelled positions."""
    targets = TeacherTargets(top_k)
    device = next(model.parameters()).device
    keys = sorted(rows, key=lambda k: len(rows[k]["input_ids"]))  # similar lengths share a batch
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            width = max(len(rows[k]["input_ids"]) for k in batch)
            input_ids = torch.tensor([rows[k]["input_ids"] + [pad_token_id] * (width - len(rows[k]["input_ids"]))
                                      for k in batch], device=device)
            attention = (torch.arange(width, device=device)[None, :]
                         < torch.tensor([len(rows[k]["input_ids"]) for k in batch], device=device)[:, None]).long()
            logprobs = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits.float().log_softmax(-1)
            for r, key in enumerate(batch):
                labels = torch.tensor(rows[key]["labels"], device=device)
                labelled = torch.nonzero(labels[1:] != -100).squeeze(-1)  # position t predicts token t + 1
                targets.add(key, logprobs[r, labelled])
    finally:
        model.train(was_training)
    return targets
