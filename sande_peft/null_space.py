"""Keep the adapter off the directions clean inputs use: a null-space constraint on LoRA's A matrices.

A LoRA layer adds ``B A x`` to a linear layer's output. Where ``A x`` is zero for every input ``x``
that clean text gives the layer, the adapter cannot change the model on clean text at all, whatever
it learns; only inputs with a component outside those directions (a trigger's route) are changed.
AlphaEdit (Fang et al., ICLR 2025) edits knowledge under the same constraint.

Per LoRA layer, ``C = E[x x^T]`` over the suspect model's inputs to it on the clean rows; ``U`` holds
the top eigenvectors of ``C`` that carry ``share`` of its trace; ``A`` is kept at ``A (I - U U^T)``:
projected once before training and again after every optimizer step (projected gradient descent).

The converse, `parrot_direction_bases`: ``A`` may read only the few directions along which the trained parrot
moves the layer's input most for the clean inputs' spread along them (``A <- A Q Q^T``), so that the adapter acts
where the parrot (the trigger's stand-in) acts and little elsewhere, even where the two share dominant directions.

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


def keep_rows_(weight: torch.Tensor, basis: torch.Tensor) -> None:
    """In place: ``weight <- weight basis basis^T``, so that ``weight @ x`` reads only ``x``'s part in ``basis``
    (orthonormal columns; none: ``weight`` becomes zero)."""
    with torch.no_grad():
        w = weight.float()
        u = basis.to(device=weight.device, dtype=torch.float32)
        weight.copy_(((w @ u) @ u.T).to(weight.dtype))


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


@contextmanager
def _paired_moments(layers: dict[str, torch.nn.Module], mask_holder: dict):
    """Over doubled batches (the rows without the parrot, then the same rows with it): per layer, ``sum d d^T`` of
    the parrot's displacement ``d`` of each unpadded token's input, and ``sum x x^T`` of the inputs without it."""
    moved: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}

    def add(sums, name, moment):
        sums[name] = sums[name] + moment.cpu() if name in sums else moment.cpu()

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0]
            half = x.shape[0] // 2
            mask = mask_holder["mask"].reshape(-1).to(x.device)
            without = x[:half].reshape(-1, x.shape[-1])[mask].float()
            delta = x[half:].reshape(-1, x.shape[-1])[mask].float() - without
            add(moved, name, delta.T @ delta)
            add(plain, name, without.T @ without)
        return accumulate

    handles = [module.base_layer.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        yield moved, plain
    finally:
        for handle in handles:
            handle.remove()


#: Displacement below this share of the clean inputs' energy along a direction is rounding, not the parrot: a
#: layer below a latent parrot sees the same inputs with and without it.
_MIN_DISPLACEMENT = 1e-6


def leading_displacement_basis(displacement: torch.Tensor, clean: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` directions ``v`` with the largest ``v^T D v / v^T C v`` (``D``: the parrot's displacement moment,
    ``C``: the clean inputs' moment plus its mean eigenvalue times the identity), orthonormalized, as a ``(d, k)``
    matrix with ``k <= rank`` (fewer where the parrot moves the inputs along fewer directions, none where it does not
    move them). The added mean eigenvalue makes directions clean text uses less than average count as equally free:
    without it the ratio picks directions where both are near zero, and ``A`` reads little of what the parrot moves.

    >>> clean = torch.diag(torch.tensor([100.0, 1.0, 1.0]))   # clean inputs use the first direction most
    >>> moved = torch.diag(torch.tensor([10.0, 5.0, 0.0]))    # the parrot moves the first two
    >>> leading_displacement_basis(moved, clean, 1).abs().squeeze(1).tolist()
    [0.0, 1.0, 0.0]
    """
    d = clean.shape[0]
    c = clean.double()
    c = c + (c.trace() / d + 1e-12) * torch.eye(d, dtype=torch.float64)
    lower = torch.linalg.cholesky(c)
    whitened = torch.linalg.solve_triangular(lower, displacement.double(), upper=False)
    whitened = torch.linalg.solve_triangular(lower, whitened.T, upper=False).T  # L^-1 D L^-T
    values, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    k = min(rank, int((values > _MIN_DISPLACEMENT).sum()))
    directions = torch.linalg.solve_triangular(lower.T, vectors[:, :k], upper=True)  # back from the whitened space
    return torch.linalg.qr(directions)[0].float().contiguous() if k else torch.zeros(d, 0)


@torch.no_grad()
def parrot_direction_bases(model, paired_batches: Iterable[tuple[dict, torch.Tensor]], rank: int,
                           forward) -> dict[str, torch.Tensor]:
    """Per LoRA layer of ``model``: `leading_displacement_basis` of the parrot's displacement of its inputs.

    ``paired_batches`` yields ``(batch, mask)``: a batch whose second half is its first half carrying the parrot, and
    the first half's attention mask; ``forward(batch)`` runs the model on it with the parrot in place. Run it with
    the adapter off: the directions are the suspect's.
    """
    if rank < 1:
        raise ValueError(f"`rank` is {rank}; use the number of directions each LoRA layer's A may read, e.g. 16.")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers: the parrot-direction constraint needs a peft LoRA adapter.")
    holder = {}
    with _paired_moments(layers, holder) as (moved, plain):
        for batch, mask in paired_batches:
            holder["mask"] = mask.bool()
            forward(batch)
    return {name: leading_displacement_basis(moved[name], plain[name], rank) for name in moved}


def project_adapter_(model, bases: dict[str, torch.Tensor], keep: bool = False, rescale: bool = False) -> None:
    """Keep each LoRA layer's ``A`` off its basis: ``A <- A (I - U U^T)``, for the active adapter(s); with ``keep``,
    on it: ``A <- A U U^T``. ``rescale``: each row of ``A`` then gets back the norm it had (where it keeps any), as
    LoRA's initialization set it; a few directions out of hundreds would otherwise leave ``A x``, and with it the
    gradient of ``B`` (zero at the start), too small to learn from."""
    project = keep_rows_ if keep else project_rows_
    for name, module in lora_layers(model).items():
        if name in bases:
            for weight in _active_lora_a(module):
                before = weight.detach().float().norm(dim=1, keepdim=True)
                project(weight, bases[name])
                if rescale:
                    with torch.no_grad():
                        after = weight.float().norm(dim=1, keepdim=True)
                        scale = torch.where(after > 1e-12, before / after.clamp(min=1e-12), torch.ones_like(after))
                        weight.copy_((weight.float() * scale).to(weight.dtype))
