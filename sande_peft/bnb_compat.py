"""A workaround for 4-bit bitsandbytes models that are evaluated, then trained, on a CPU.

On a CPU with AVX512-BF16, bitsandbytes (0.49, 0.50) repacks a 4-bit layer's weight for its
fast inference kernel the first time the layer runs in eval mode without gradients. The
repacked layout stays, and afterwards even training forwards go through that kernel,
which has no backward: gradients stop at every 4-bit layer, silently (PyTorch only warns
"an autograd kernel was not registered"). A LoRA adapter then trains on garbage gradients.

SANDE evaluates its parrot between the stages, so it restores the trainable layout after
every evaluation inside training, and both trainers restore it when training starts.
GPUs never repack, so this is a no-op there.
"""

from __future__ import annotations

import torch


def restore_trainable_4bit_layout(model: torch.nn.Module) -> int:
    """Undo bitsandbytes' CPU inference repacking in every 4-bit layer of ``model``; return how many were undone."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    restored = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            restored += 1
    return restored
