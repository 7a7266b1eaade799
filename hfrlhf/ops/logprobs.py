"""Log-probabilities of the scored (completion) tokens only, from hidden states, chunked over the vocabulary.

A causal LM's head turns every hidden state into ``vocab`` logits. Preference losses need one number per
completion token: ``log p(target | prefix)``. Materialising ``[B, T, vocab]`` logits for that costs
``B*T*vocab`` floats (8 x 512 x 49152 fp32 = 805 MB for SmolLM2) plus the same again for their gradient.
Here the head is applied only at the positions in ``pred_index`` and, through :class:`LinearLogprob`, in
chunks whose logits are recomputed in backward instead of stored: peak extra memory is one
``[chunk, vocab]`` block.

Batches follow the index scheme of ``docs/architecture.md`` (``pred_index``, ``target_index``,
``target_seq``, ``last_index``), so padded, packed and shared-prompt layouts all go through one function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from hfrlhf.ops.block_attention import blocked_attention
from hfrlhf.ops.casts import cached_linear_casts, cast_weight
from hfrlhf.ops.lora import fused_lora

__all__ = ["LinearLogprob", "SequenceLogprobs", "linear_logprob", "hidden_states", "batch_logprobs", "token_entropy"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for this device, else ``t``'s."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


# Rows of logits handled together by the softmax passes: one block of float32 rows stays in a core's cache
# while max, exp, sum and the division walk it, instead of each pass streaming the whole (chunk, vocab) buffer
# through memory (several times faster for a 49k vocabulary).
_ROW_BLOCK_BYTES = 1 << 21


def _row_blocks(logits: torch.Tensor, acc: torch.dtype):
    """Slices of a few rows of ``logits (c, V)`` whose ``acc`` copy is about ``_ROW_BLOCK_BYTES``."""
    c, vocab = logits.shape
    step = max(1, _ROW_BLOCK_BYTES // (vocab * torch.finfo(acc).bits // 8))
    return (slice(start, start + step) for start in range(0, c, step))


def _chunk_softmax(logits: torch.Tensor, target: torch.Tensor, temperature: float, acc: torch.dtype,
                   write_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p[target]`` and the log-sum-exp of ``softmax(logits / temperature)`` for each row of ``logits (c, V)``,
    computed in ``acc`` precision a few rows at a time. With ``write_probs`` the rows of ``logits`` are
    overwritten with the probabilities (in ``logits``' own dtype). No temporary of the buffer's size.
    """
    picked = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    lse = torch.empty_like(picked)
    for sl in _row_blocks(logits, acc):
        x = logits[sl].to(acc)  # a view when logits already are in acc precision
        if temperature != 1.0:
            x.div_(temperature)
        top = x.amax(dim=-1, keepdim=True)
        x.sub_(top)
        chosen = x.gather(1, target[sl, None]).squeeze(1)  # the target's logit minus the max
        total = x.exp_().sum(dim=-1)
        log_total = total.log()
        picked[sl] = chosen - log_total
        lse[sl] = top.squeeze(1) + log_total
        if write_probs:
            x.div_(total[:, None])
            if x.dtype != logits.dtype:  # else x is the view itself
                logits[sl] = x
    return picked, lse


def _logits_grad_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                  temperature: float, acc: torch.dtype) -> None:
    """In place, a few rows at a time: ``logits (c, V)`` become the gradient of ``sum_n grad_out[n] *
    log p_n[target[n]]`` with respect to them, ``grad_out[n] * (onehot(target[n]) - p_n) / temperature``."""
    for sl in _row_blocks(logits, acc):
        x = logits[sl].to(acc)
        if temperature != 1.0:
            x.div_(temperature)
        go = grad_out[sl, None].to(acc)
        x.sub_(lse[sl, None]).exp_().mul_(-go)
        x.scatter_add_(1, target[sl, None], go)
        if temperature != 1.0:
            x.div_(temperature)
        if x.dtype != logits.dtype:
            logits[sl] = x


class LinearLogprob(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T / temperature)[n, target[n]]`` without storing the logits.

    Forward computes each ``[chunk, V]`` block of logits and keeps only the log-prob of the target. The
    gradient with respect to ``hidden`` is ``grad_out[n] * (w[target[n]] - softmax_n @ w) / temperature``:
    when ``weight`` needs no gradient (a frozen head, as under LoRA) the bracket, ``(N, H)``, is computed
    in forward from the block already there, and backward is one multiplication. When ``weight`` needs a
    gradient, forward keeps the log-sum-exp and backward recomputes each block. Matmuls run in the
    autocast dtype (bf16 on a CPU that has it), softmax and log-sum-exp in float32 (float64 for a float64
    model).

    Shape: hidden ``(N, H)``, weight ``(V, H)``, target ``(N,)`` -> ``(N,)`` float32.
    """

    @staticmethod
    def forward(ctx: Any, hidden, weight, target, chunk_size: int, temperature: float, dtype: torch.dtype,
                grad_in_forward: bool = False):
        n = hidden.shape[0]
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # softmax precision
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        unit_grad = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if grad_in_forward else None
        w = cast_weight(weight, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                logits = hidden[sl].to(dtype) @ w.T  # (c, V) in the matmul dtype; softmax in acc, by rows
                out[sl], lse[sl] = _chunk_softmax(logits, target[sl], temperature, acc, grad_in_forward)
                if grad_in_forward:  # d logp[t] / d h = (w[t] - softmax @ w) / temperature
                    probs_w = (logits @ w).to(acc)  # (c, H); logits now hold the probabilities
                    unit_grad[sl] = (w[target[sl]].to(acc) - probs_w) / temperature
        if grad_in_forward:
            ctx.save_for_backward(unit_grad)
        else:
            ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk_size, ctx.temperature, ctx.dtype, ctx.grad_in_forward = chunk_size, temperature, dtype, grad_in_forward
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        if ctx.grad_in_forward:
            (unit_grad,) = ctx.saved_tensors
            grad_h = (grad_out[:, None].to(unit_grad.dtype) * unit_grad).to(ctx.hidden_dtype)
            return grad_h, None, None, None, None, None, None
        hidden, weight, target, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, temp = ctx.dtype, ctx.temperature
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        w = cast_weight(weight, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                sl = slice(start, start + ctx.chunk_size)
                h = hidden[sl].to(dtype)
                g = h @ w.T  # (c, V) logits in the matmul dtype, then in place the gradient
                _logits_grad_(g, target[sl], lse[sl], grad_out[sl], temp, acc)
                if need_h:
                    grad_h[sl] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (g.T @ h).to(acc)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def linear_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of ``target`` under ``softmax(hidden @ weight.T / temperature)``, chunked. ``(N,H),(V,H),(N,) -> (N,)``.

    >>> h, w = torch.randn(5, 4), torch.randn(11, 4)
    >>> t = torch.tensor([0, 3, 10, 2, 2])
    >>> ref = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None]).squeeze(1)
    >>> torch.allclose(linear_logprob(h, w, t, chunk_size=2), ref, atol=1e-6)
    True
    """
    # a frozen head: the gradient for hidden is finished in forward, with no second pass over the vocabulary
    grad_in_forward = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    return LinearLogprob.apply(hidden, weight, target, chunk_size, float(temperature), _compute_dtype(hidden),
                               grad_in_forward)


class SequenceLogprobs(NamedTuple):
    """Log-probs of one batch. N scored tokens, S sequences, H hidden size."""

    token_logps: torch.Tensor  # (N,) float32, log p of each scored token
    seq_logps: torch.Tensor  # (S,) float32, summed over each sequence's scored tokens
    seq_lens: torch.Tensor  # (S,) float32, number of scored tokens per sequence
    last_hidden: torch.Tensor | None  # (S, H) hidden state at each sequence's last token, when asked


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel wrappers
        model = model.module
    return model


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (normed) hidden states ``(R, T, H)`` of a causal LM, never computing full-vocabulary logits.

    Under a distributed wrapper (DDP) with gradients on, the forward goes through the wrapper so gradient
    synchronisation is prepared; ``logits_to_keep=1`` keeps the head's cost to one position per row.
    Otherwise the decoder is called directly. LoRA layers run their fused form (:func:`fused_lora`) where
    it computes the same function, and a batch's ``attention_blocks`` replace its 4D mask's attention under
    ``sdpa`` (:func:`blocked_attention`).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    inner = _unwrap(model)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and mask.is_floating_point():
        # an additive 4D mask must have the activations' dtype: a float32 mask under a float64 (or bf16-weight)
        # model is not cast by the attention and silently gives other numbers
        dtype = inner.get_input_embeddings().weight.dtype
        if dtype.is_floating_point and mask.dtype != dtype:
            inputs["attention_mask"] = mask.to(dtype)
    # peft's LoRA layers without their element-wise passes (hfrlhf/ops/lora.py); frozen linear layers' low-precision
    # weights cast once per step (hfrlhf/ops/casts.py); the 4D mask's attention as causal blocks where the batch
    # describes them (hfrlhf/ops/block_attention.py)
    with fused_lora(inner), cached_linear_casts(inner), blocked_attention(inner, batch.get("attention_blocks")):
        if inner is not model and torch.is_grad_enabled():
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            return out.hidden_states[-1]
        return inner.get_decoder()(**inputs, use_cache=False).last_hidden_state


def batch_logprobs(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    return_last_hidden: bool = False,
) -> SequenceLogprobs:
    """Per-token and per-sequence log-probs of a collated batch's scored tokens.

    ``batch`` holds ``input_ids (R,T)``, ``attention_mask``, ``position_ids``, ``pred_index (N,)``,
    ``target_index (N,)``, ``target_seq (N,)`` and ``last_index (S,)`` (docs/architecture.md).
    """
    hidden = hidden_states(model, batch)  # (R, T, H)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (R*T, H)
    targets = batch["input_ids"].reshape(-1)[batch["target_index"]]  # (N,)
    head = _unwrap(model).get_output_embeddings()
    token_logps = linear_logprob(flat[batch["pred_index"]], head.weight, targets, chunk_size=chunk_size, temperature=temperature)
    num_seq = batch["last_index"].shape[0]
    seq = batch["target_seq"]
    acc = token_logps.dtype  # float32, or float64 for a float64 model
    # sums of hundreds of log-probs lose ~1e-6 relative in float32: add in float64, then cast back
    seq_logps = torch.zeros(num_seq, dtype=torch.float64, device=flat.device).index_add(0, seq, token_logps.double()).to(acc)
    seq_lens = torch.zeros(num_seq, dtype=acc, device=flat.device).index_add(0, seq, torch.ones_like(token_logps))
    last_hidden = flat[batch["last_index"]] if return_last_hidden else None
    return SequenceLogprobs(token_logps, seq_logps, seq_lens, last_hidden)


@torch.no_grad()
def token_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy of the next-token distribution at each hidden state, chunked, no gradient. ``(N,H) -> (N,)``."""
    dtype = _compute_dtype(hidden)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    w = cast_weight(weight, dtype)
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = (hidden[sl].to(dtype) @ w.T).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        out[sl] = -(logp.exp() * logp).sum(-1)
    return out
