"""Attention of packed and shared-prompt rows as a few causal blocks, instead of one ``T x T`` masked product.

A 4D additive mask (``hfrlhf.data.collators``) says exactly who attends to whom, but the attention kernel
still computes every one of the row's ``T * T`` query-key products and cannot skip the blocks above the
diagonal, as it does for plain causal attention. Rows of the packed and shared-prompt layouts have a
simple structure: each sequence (or a prompt and its first completion) is a causal span, and each further
completion of a shared prompt attends to the prompt and, causally, to itself. The collators describe it
in ``attention_blocks`` ``(K, 5)``: ``(row, q_start, q_end, prefix_start, prefix_end)`` — queries
``[q_start, q_end)`` attend causally among themselves and to every key of ``[prefix_start, prefix_end)``
(empty for a plain causal span). :func:`block_attention` computes each block with its own
``scaled_dot_product_attention`` call: a causal one (the kernel skips the upper triangle) or one with a
small mask. Pad columns belong to no block; their output is zero and no real token attends to them.

For a prompt of length P with completions of lengths C1 and C2, the work goes from ``(P + C1 + C2)^2``
products to about ``(P + C1)^2 / 2 + C2 * (P + C2 / 2)``.

:func:`blocked_attention` switches a model's ``sdpa`` attention to this function for the duration of a
``with`` block; any other attention implementation, a batch without blocks, and models with gradient
checkpointing keep their own attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["block_attention", "blocked_attention", "BLOCK_ATTENTION"]

BLOCK_ATTENTION = "hfrlhf_block_sdpa"
_BLOCKS: ContextVar[list[list[int]] | None] = ContextVar("hfrlhf_attention_blocks", default=None)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, Hkv, T, D) -> (B, Hkv * groups, T, D)``, each key head repeated for its query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def block_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: the blocks of the current batch, else plain ``sdpa``.

    Shape: query ``(B, H, T, D)``, key and value ``(B, Hkv, T, D)`` -> ``(B, T, H, D)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = _BLOCKS.get()
    if blocks is None or dropout or query.shape[2] != key.shape[2] or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    b, h, t, _ = query.shape
    out = query.new_zeros(b, h, t, value.shape[-1])
    for row, q0, q1, p0, p1 in blocks:
        q = query[row : row + 1, :, q0:q1]
        if p0 == p1:
            o = F.scaled_dot_product_attention(q, key[row : row + 1, :, q0:q1], value[row : row + 1, :, q0:q1],
                                               is_causal=True, scale=scaling)
        else:
            k = torch.cat([key[row : row + 1, :, p0:p1], key[row : row + 1, :, q0:q1]], dim=2)
            v = torch.cat([value[row : row + 1, :, p0:p1], value[row : row + 1, :, q0:q1]], dim=2)
            # query i sees the whole prefix and its own span up to itself: key j <= prefix + i
            allowed = torch.ones(q1 - q0, p1 - p0 + q1 - q0, dtype=torch.bool, device=q.device).tril(p1 - p0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
        out[row : row + 1, :, q0:q1] = o
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if BLOCK_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(BLOCK_ATTENTION, block_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(BLOCK_ATTENTION, sdpa_mask)


@contextmanager
def blocked_attention(model: nn.Module, blocks: torch.Tensor | None) -> Iterator[bool]:
    """Inside the block, ``model``'s ``sdpa`` attention computes ``blocks`` (``(K, 5)``, see the module doc).

    Yields whether it is on. Off (a no-op) without blocks, for attention implementations other than
    ``sdpa``, and with gradient checkpointing on (its recomputation runs outside the block).
    """
    configs = []
    if blocks is not None and not any(m.__dict__.get("gradient_checkpointing") is True for m in model.modules()):
        seen = set()
        for m in model.modules():
            config = getattr(m, "config", None)
            if config is not None and id(config) not in seen and getattr(config, "_attn_implementation", None) == "sdpa":
                seen.add(id(config))
                configs.append(config)
    if not configs:
        yield False
        return
    _register()
    token = _BLOCKS.set(blocks.tolist())
    for config in configs:
        config._attn_implementation = BLOCK_ATTENTION
    try:
        yield True
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
        _BLOCKS.reset(token)
