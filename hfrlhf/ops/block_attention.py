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


def _row_blocks(blocks: list[list[int]]) -> dict[int, list[tuple[int, int, int, int]]]:
    """The blocks of each row: ``{row: [(q_start, q_end, prefix_start, prefix_end), ...]}``."""
    rows: dict[int, list[tuple[int, int, int, int]]] = {}
    for row, q0, q1, p0, p1 in blocks:
        rows.setdefault(row, []).append((q0, q1, p0, p1))
    return rows


def _pieces(x: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """``x`` ``(H, T, D)`` split along T at ``cuts`` (sorted, from 0 to T): views whose backward is one concatenation."""
    return list(x.split([b - a for a, b in zip(cuts, cuts[1:])], dim=1))


def _span(pieces: list[torch.Tensor], index: dict[int, int], start: int, end: int) -> list[torch.Tensor]:
    """The pieces covering ``[start, end)`` (both are cut points; none when the span is empty)."""
    return pieces[index[start] : index[end]]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


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

    Each row is cut at every block boundary into views (``split``), each block's queries, keys and values are
    put together from those pieces, and the row's output from the blocks' outputs and zeros for pad columns:
    no full-size buffer is written block by block, so backward makes no full-size zero gradient per block
    either. Key and value heads shared by several query heads (grouped-query attention) are not copied.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = _BLOCKS.get()
    if blocks is None or dropout or query.shape[2] != key.shape[2] or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    b, h, t, _ = query.shape
    per_row = _row_blocks(blocks)
    parts = []  # every row's output pieces in order, each (length, H, D): one concatenation gives (B, T, H, D)
    for row, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        spans = per_row.get(row, [])
        cuts = sorted({0, t, *(c for span in spans for c in span)})
        index = {c: i for i, c in enumerate(cuts)}
        qs, ks, vs = _pieces(q_row, cuts), _pieces(k_row, cuts), _pieces(v_row, cuts)
        outputs: list[torch.Tensor | None] = [None] * (len(cuts) - 1)
        for q0, q1, p0, p1 in spans:
            q = _cat(_span(qs, index, q0, q1))[None]
            own_k, own_v = _span(ks, index, q0, q1), _span(vs, index, q0, q1)
            if p0 == p1:
                o = F.scaled_dot_product_attention(q, _cat(own_k)[None], _cat(own_v)[None], is_causal=True,
                                                   scale=scaling, enable_gqa=gqa)
            else:
                k = _cat(_span(ks, index, p0, p1) + own_k)[None]
                v = _cat(_span(vs, index, p0, p1) + own_v)[None]
                # query i sees the whole prefix and its own span up to itself: key j <= prefix + i
                allowed = torch.ones(q1 - q0, p1 - p0 + q1 - q0, dtype=torch.bool, device=q.device).tril(p1 - p0)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
            first, last = index[q0], index[q1]
            sizes = [cuts[i + 1] - cuts[i] for i in range(first, last)]
            for i, piece in zip(range(first, last), o[0].split(sizes, dim=1)):
                outputs[i] = piece.transpose(0, 1)
        for i, piece in enumerate(outputs):  # pad columns (in no block): zeros
            parts.append(query.new_zeros(cuts[i + 1] - cuts[i], h, value.shape[-1]) if piece is None else piece)
    return torch.cat(parts).view(b, t, h, value.shape[-1]), None


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
