"""Keep the adapter off the directions clean inputs use: a null-space constraint on LoRA's A matrices.

A LoRA layer adds ``B A x`` to a linear layer's output. Where ``A x`` is zero for every input ``x``
that clean text gives the layer, the adapter cannot change the model on clean text at all, whatever
it learns; only inputs with a component outside those directions (a trigger's route) are changed.
AlphaEdit (Fang et al., ICLR 2025) edits knowledge under the same constraint.

Per LoRA layer, ``C = E[x x^T]`` over the suspect model's inputs to it on the clean rows; ``U`` holds
the top eigenvectors of ``C`` that carry ``share`` of its trace; ``A`` is kept at ``A (I - U U^T)``:
projected once before training and again after every elimination step (projected gradient descent).

>>> import torch
>>> from torch import nn
>>> basis = torch.tensor([[1.0], [0.0]])  # clean inputs use the first direction only
>>> a = nn.Linear(2, 1, bias=False)
>>> _ = a.weight.data.copy_(torch.tensor([[3.0, 4.0]]))
>>> project_rows_(a.weight, basis)
>>> a.weight.tolist()
[[0.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch


def project_rows_(weight: torch.Tensor, basis: torch.Tensor) -> None:
    """In place: ``weight <- weight (I - basis basis^T)``, so that ``weight @ x`` ignores ``x``'s part in ``basis``."""
    with torch.no_grad():
        w = weight.float()
        u = basis.to(device=weight.device, dtype=torch.float32)
        weight.copy_((w - (w @ u) @ u.T).to(weight.dtype))


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """The model's LoRA layers with an ``A`` matrix (peft's `LoraLayer`s other than embeddings), by name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and len(module.lora_A) > 0}


def _active_lora_a(module) -> Iterable[torch.Tensor]:
    return [module.lora_A[name].weight for name in module.active_adapters if name in module.lora_A]


@contextmanager
def _input_moments(layers: dict[str, torch.nn.Module], mask_holder: dict):
    """Accumulate ``sum x x^T`` of each layer's input over the unpadded tokens (``mask_holder["mask"]``)."""
    moments: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0]
            mask = mask_holder["mask"].reshape(-1).to(x.device)
            x = x.reshape(-1, x.shape[-1])[mask].float()
            moment = x.T @ x
            moments[name] = moments[name] + moment.cpu() if name in moments else moment.cpu()
        return accumulate

    handles = [module.base_layer.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def clean_input_bases(model, rows: Iterable[dict], share: float, pad_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per LoRA layer of ``model``: the top eigenvectors of its inputs' second moment over ``rows`` (``input_ids``
    lists) that carry ``share`` of the moment's trace, as a ``(in_features, k)`` matrix. Run it with the adapter off:
    the directions are the suspect's."""
    if not 0 < share < 1:
        raise ValueError(f"`share` is {share}; use a share of the inputs' second moment in (0, 1), e.g. 0.9.")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers: the null-space constraint needs a peft LoRA adapter.")
    rows = [list(row["input_ids"]) for row in rows]
    device = next(model.parameters()).device
    holder, tokens = {}, 0
    with _input_moments(layers, holder) as moments:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in batch], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
            holder["mask"] = mask.bool()
            model(input_ids=ids, attention_mask=mask)
            tokens += int(mask.sum())
    bases = {}
    for name, moment in moments.items():
        values, vectors = torch.linalg.eigh(moment.double() / max(tokens, 1))
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        cumulative = values.cumsum(0) / values.sum().clamp(min=1e-30)
        k = int((cumulative < share).sum()) + 1
        bases[name] = vectors[:, :k].float().contiguous()
    return bases


def project_adapter_(model, bases: dict[str, torch.Tensor]) -> None:
    """Keep each LoRA layer's ``A`` off its basis: ``A <- A (I - U U^T)``, for the active adapter(s)."""
    for name, module in lora_layers(model).items():
        if name in bases:
            for weight in _active_lora_a(module):
                project_rows_(weight, bases[name])
