"""A fused forward and backward for peft's LoRA linear layers: the same numbers, fewer passes over memory.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: next to the three matrix products it
makes a full ``(N, out)`` product by ``scaling`` and a full ``(N, out)`` sum in forward, and their
counterparts in backward (the upstream gradient times ``scaling``, and the sum of the two input
gradients). On a CPU these element-wise passes cost as much as a sizeable share of the matrix products
themselves. :class:`LoraLinear` folds the scaling and the sums into the products
(``addmm(..., alpha=scaling)``):

    forward:  y = x W^T (+ b);  u = x A^T;  y += s * u B^T
    backward: gB = s * g B;  dx = g W + gB A;  dA = gB^T x;  dB = s * g^T u

:func:`fused_lora` switches it on for the layers of a model for the duration of a ``with`` block (the
autograd graph built inside keeps it for backward). A layer keeps peft's own forward whenever the fused
one would not compute the same function: adapters disabled or merged, several active adapters, DoRA or
another variant, a LoRA bias, dropout that is active, a base layer that is not a plain ``nn.Linear``, or
weights of mixed dtypes. Models that recompute activations in backward (gradient checkpointing) keep
peft's forward too, so the recomputed graph matches the first one.

Under autocast (bf16 or fp16) the layer computes in the autocast dtype, as peft's layers do there: the input
and the weights are cast to it and the products run in it. Two things differ, both in the direction of
fewer roundings: peft rounds ``u B^T``, its product by ``s`` and the sum to the low precision one after the
other, where ``addmm`` rounds once; and a layer input shared by several LoRA layers (the query, key and value
projections read one tensor, as do the gate and up projections) is cast once, not once per product. The
tests bound both paths' error against a float64 evaluation of the same function. With its adapters off (a
reference pass) a layer under autocast computes its base layer exactly as autocast does, only with that
shared input cast once.

>>> from peft import LoraConfig, get_peft_model
>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> model = get_peft_model(build_tiny_llama(build_tiny_tokenizer()), LoraConfig(r=4, target_modules="all-linear"))
>>> ids = torch.tensor([[5, 6, 7]])
>>> with fused_lora(model) as n:
...     fused = model(input_ids=ids).logits
>>> n > 0 and torch.allclose(fused, model(input_ids=ids).logits, atol=1e-5)
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfrlhf.ops.casts import autocast_dtype, cast_weight

__all__ = ["LoraLinear", "fused_lora"]


class LoraLinear(torch.autograd.Function):
    """``x W^T + b + scaling * (x A^T) B^T`` with the scaling and the sums inside the matrix products.

    Shape: x ``(..., in)``, W ``(out, in)``, b ``(out,)`` or None, A ``(r, in)``, B ``(out, r)`` -> ``(..., out)``.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = torch.mm(x2, weight.T) if bias is None else torch.addmm(bias, x2, weight.T)  # (N, out)
        u = torch.mm(x2, lora_a.T)  # (N, r)
        y.addmm_(u, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, u)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x2, weight, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        g_b = torch.mm(g, lora_b).mul_(s)  # (N, r): the gradient reaching u, scaling included
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        if need_x:
            grad_x = torch.mm(g, weight).addmm_(g_b, lora_a).reshape(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g.T, x2)
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = torch.mm(g_b.T, x2)
        if need_lb:
            grad_lb = torch.mm(g.T, u).mul_(s)
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None


def _plain_vanilla(layer: nn.Module, x: torch.Tensor) -> str | None:
    """The one active adapter of ``layer`` when the fused forward computes exactly peft's function, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(name, False):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if type(base) is not nn.Linear or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    if base._forward_hooks or base._forward_pre_hooks or lora_a._forward_hooks or lora_b._forward_hooks:
        return None
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training))):
        return None
    if not (base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype) or not x.dtype.is_floating_point:
        return None
    if autocast_dtype(x, base.weight) is None and x.dtype != base.weight.dtype:
        return None
    return name


def _base_only(layer: nn.Module) -> bool:
    """Whether ``layer`` computes its base layer alone (adapters off, not merged), a plain hook-free ``nn.Linear``."""
    base = layer.base_layer
    return (layer.disable_adapters and not layer.merged and type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks))


class _CastCache:
    """The low-precision copy of the last layer input cast under autocast, reused while the same tensor (same
    version, same grad mode) comes in again: the query, key and value projections read one input, as do the
    gate and up projections. One entry; it holds the input itself, so its ``id`` cannot be reused meanwhile."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None
        self.cast: torch.Tensor | None = None

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        key = (id(x), x._version, x.requires_grad, torch.is_grad_enabled(), dtype)
        if key != self.key or self.source is not x:
            self.key, self.source, self.cast = key, x, x.to(dtype)
        return self.cast

    def clear(self) -> None:
        self.key = self.source = self.cast = None


def _fused_forward(layer: nn.Module, original: Any, cache: _CastCache):
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return original(x, *args, **kwargs)
        base = layer.base_layer
        dtype = autocast_dtype(x, base.weight)
        name = _plain_vanilla(layer, x)
        if name is None:
            if dtype is None or not _base_only(layer):
                return original(x, *args, **kwargs)
            # adapters off (a reference pass): the base layer as autocast computes it, the input cast once
            bias = None if base.bias is None else cast_weight(base.bias, dtype)
            return F.linear(cache.get(x, dtype), cast_weight(base.weight, dtype), bias)
        weights = (base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight)
        if dtype is not None:  # as autocast computes a linear layer: everything in its dtype
            x = cache.get(x, dtype)
            weights = tuple(None if w is None else cast_weight(w, dtype) for w in weights)
        return LoraLinear.apply(x, *weights, float(layer.scaling[name]))

    return forward


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if type(m) is Linear]


@contextmanager
def fused_lora(model: nn.Module) -> Iterator[int]:
    """Inside the block, peft LoRA linear layers of ``model`` run :class:`LoraLinear` where it is exact.

    Yields the number of LoRA layers switched. A no-op for models without LoRA layers and for models with
    gradient checkpointing on. The layers get their own forward back on exit; gradients of a graph built
    inside flow through :class:`LoraLinear`'s backward.
    """
    if any(m.__dict__.get("gradient_checkpointing") is True for m in model.modules()):
        yield 0
        return
    layers = [m for m in _lora_linears(model) if "forward" not in m.__dict__]  # not already switched
    cache = _CastCache()
    for m in layers:
        m.forward = _fused_forward(m, m.forward, cache)
    try:
        yield len(layers)
    finally:
        cache.clear()
        for m in layers:
            del m.forward

