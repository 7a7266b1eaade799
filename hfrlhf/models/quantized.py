"""4-bit (bitsandbytes) layers that stay trainable on CPUs with AVX512-BF16.

On such CPUs bitsandbytes re-lays out a ``Linear4bit`` weight for a faster inference kernel the first time the
layer runs in eval mode without gradients (an evaluation, a generation, a reference pass). That layout is never
undone for training, and it has two consequences for a model that is later trained or saved:

- the inference kernel has no backward: in training, no gradient flows to the layer's input, so every LoRA
  adapter below a re-laid-out layer gets a wrong (truncated) gradient, silently;
- saving (``state_dict``) converts the weight back but leaves its scales in the inference layout, so the model
  in memory computes with scrambled weights after the first checkpoint.

:func:`keep_4bit_weights_trainable` switches that re-layout off (the layers then run the same dequantize-and-
matmul path in training and inference, as on every other CPU) and repairs layers that were re-laid out already.
The library's loaders call it on every model they load, and the trainers on the models they train (DPO, KTO
and SFT on their reference too); it does nothing to models without 4-bit layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["keep_4bit_weights_trainable"]


def _linear4bit_class() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return None
    return getattr(getattr(bnb, "nn", None), "Linear4bit", None)


def _restore_layout(module: nn.Module) -> None:
    """Back from the CPU inference layout to the standard one, scales included."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    state = weight.quant_state
    if not state.nested and state.absmax.dim() == 2:  # scales still [blocks per row, rows]: one per block again
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()


def _needs_restore(state: object) -> bool:
    """Re-laid out for inference, or converted back by a save that left the scales in the inference layout."""
    if state is None:
        return False
    absmax = getattr(state, "absmax", None)
    return bool(getattr(state, "packing_format_for_cpu", False)) or (
        not getattr(state, "nested", False) and isinstance(absmax, torch.Tensor) and absmax.dim() == 2)


def keep_4bit_weights_trainable(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in the layout training needs; returns how many there are.

    Layers already switched to the CPU inference layout are restored, with a warning: their scales were rounded
    to bfloat16 by the switch (load the model with the library's loaders, or pass it to a trainer, before running
    it in eval mode, to keep them exact).
    """
    cls = _linear4bit_class()
    if cls is None:
        return 0
    count = restored = 0
    for module in model.modules():
        if not isinstance(module, cls):
            continue
        count += 1
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if _needs_restore(getattr(module.weight, "quant_state", None)):
            _restore_layout(module)
            restored += 1
    if restored:
        warnings.warn(f"{restored} 4-bit layers had been switched to bitsandbytes' CPU inference layout (by a forward "
                      "pass in eval mode) and were restored for training; their scales were rounded to bfloat16 by "
                      "that switch", stacklevel=2)
    return count
