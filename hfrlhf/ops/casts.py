"""Low-precision copies of frozen weights, made once per training step instead of once per forward.

Under bf16 autocast every matrix product casts its float32 weight to bf16 again. A DPO step runs the frozen
base weights through two forwards (policy and reference), a KTO step through three (policy, KL pairs,
reference): the same casts, of the same unchanged weights, each time. Inside :func:`shared_weight_casts`,
:func:`cast_weight` keeps the copy of a weight that needs no gradient and hands it out again while the
weight is unchanged (same tensor, same version counter). The copies are the ones autocast would make, so
results are bit-identical; they live until the scope closes, and the autograd graph of the step holds the
copies a backward needs in any case, so the scope adds little to the peak memory.

Trainers open the scope around each ``compute_loss`` (``HfrlhfTrainer.compute_loss_context_manager``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["autocast_dtype", "cached_linear_casts", "cast_weight", "shared_weight_casts"]

_scope: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] | None = None


@contextmanager
def shared_weight_casts() -> Iterator[None]:
    """Inside the block, :func:`cast_weight` reuses its copies of frozen weights. Nested blocks share the
    outermost one's copies."""
    global _scope
    outer = _scope
    if outer is None:
        _scope = {}
    try:
        yield
    finally:
        if outer is None:
            _scope = None


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, shared inside :func:`shared_weight_casts` for a weight that needs no gradient.

    >>> w = torch.ones(2, 2)
    >>> with shared_weight_casts():
    ...     cast_weight(w, torch.bfloat16) is cast_weight(w, torch.bfloat16)
    True
    >>> with shared_weight_casts():
    ...     first = cast_weight(w, torch.bfloat16)
    ...     _ = w.mul_(2)  # changed in place: a new copy
    ...     bool(cast_weight(w, torch.bfloat16)[0, 0] == 2)
    True
    """
    if weight.dtype == dtype or _scope is None or weight.requires_grad:
        return weight.to(dtype)
    key = (id(weight), dtype)
    hit = _scope.get(key)
    if hit is not None and hit[0] is weight and hit[1] == weight._version:
        return hit[2]
    cast = weight.to(dtype)
    _scope[key] = (weight, weight._version, cast)  # holding the weight keeps its id from being reused
    return cast


def autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes ``x`` times ``weight`` in on ``x``'s device; None when autocast is off there or
    leaves these dtypes alone (it only lowers float32)."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if {x.dtype, weight.dtype} <= {torch.float32, dtype} else None


def _cached_linear_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x, layer.weight)
        if dtype is None:
            return F.linear(x, layer.weight, layer.bias)
        bias = None if layer.bias is None else cast_weight(layer.bias, dtype)
        return F.linear(x, cast_weight(layer.weight, dtype), bias)  # autocast casts x as it would anyway

    return forward


@contextmanager
def cached_linear_casts(model: nn.Module) -> Iterator[int]:
    """Inside the block, every plain ``nn.Linear`` of ``model`` whose weight needs no gradient takes its
    low-precision copy from :func:`cast_weight` (and so, inside :func:`shared_weight_casts`, casts it once),
    computing exactly what autocast computes. For loops of many small forwards over the same frozen weights,
    such as sampling a response token by token, where the casts would cost more than the products.

    Yields the number of layers switched; they get their own forward back on exit.
    """
    layers = [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad
              and "forward" not in m.__dict__ and not (m._forward_hooks or m._forward_pre_hooks)]
    for m in layers:
        m.forward = _cached_linear_forward(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward
