"""PPO's clipped policy and value losses over the tokens of sampled responses.

Proximal Policy Optimization (Schulman et al., 2017, "Proximal Policy Optimization Algorithms", eq. 7 and 9)
as applied to language models in lm-human-preference-details (Huang et al., 2023, "The N Implementation
Details of RLHF with PPO"): every real response token is one action, losses are means over real tokens of
the minibatch, and the value loss is clipped around the values predicted at rollout time.

All tensors are ``(B, T)`` over response tokens, right-padded; ``mask`` (bool or 0/1) marks real tokens.
Pads never contribute, even if they hold ``inf``/``nan``. Metrics are detached means over real tokens, named
as lm-human-preference-details / TRL's old PPO trainer log them.
"""

from __future__ import annotations

import torch

from hfrlhf.losses.base import LossOutput
from hfrlhf.ops.masked import masked_mean

__all__ = ["entropy_from_logits", "masked_entropy", "policy_loss", "value_loss"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> LossOutput:
    """Clipped surrogate objective, as a loss to minimise (Schulman et al., 2017, eq. 7).

        rho_t = exp(log pi_theta(a_t) - log pi_old(a_t))
        L     = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))     over real tokens

    Args:
        logprobs: log-probs of the sampled tokens under the current policy (with gradient), ``(B, T)``.
        old_logprobs: the same at rollout time (no gradient), ``(B, T)``.
        advantages: per-token advantages, usually whitened GAE (no gradient), ``(B, T)``.
        mask: real response tokens, ``(B, T)``.
        cliprange: ``eps``.

    Returns:
        ``LossOutput`` with a scalar loss and metrics ``policy/clipfrac`` (share of tokens where the clipped
        term is the larger, i.e. the one used), ``policy/approxkl`` (``mean 0.5 (log rho)^2``, the k2 estimate
        of KL(old || new)), ``policy/ratio`` (mean ``rho``) and ``loss/policy``.

    >>> out = policy_loss(torch.tensor([[0.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    >>> out.loss  # rho = 1: the loss is -A
    tensor(-2.)
    """
    keep = mask if mask.dtype == torch.bool else mask != 0
    # Pads may hold any value (an "invalid" log-prob, say): zero them first so no inf/nan is made,
    # neither in the loss nor in its gradient.
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    advantages = torch.where(keep, advantages.detach(), torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), keep),
            "policy/approxkl": masked_mean(0.5 * log_ratio.square(), keep),
            "policy/ratio": masked_mean(ratio, keep),
        }
    return LossOutput(loss, metrics)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = 0.2,
) -> LossOutput:
    """Clipped value loss (OpenAI Baselines' PPO2, kept by lm-human-preference-details).

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L      = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)      over real tokens

    With ``cliprange_value=None`` there is no clipping: ``L = 0.5 mean (V - R)^2``.

    Args:
        values: current value-head predictions (with gradient), ``(B, T)``.
        old_values: predictions at rollout time (no gradient), ``(B, T)``.
        returns: value targets, e.g. GAE's ``A + V_old`` (no gradient), ``(B, T)``.
        mask: real response tokens, ``(B, T)``.
        cliprange_value: ``eps_v``, or None.

    Returns:
        ``LossOutput`` with a scalar loss and metrics ``val/clipfrac`` (share of tokens where the clipped
        error is the larger), ``val/vpred`` (mean ``V``), ``val/error`` (mean ``(V - R)^2``) and
        ``loss/value``.

    >>> out = value_loss(torch.tensor([[3.0]]), torch.tensor([[1.0]]), torch.tensor([[4.0]]), torch.ones(1, 1), 0.5)
    >>> out.loss  # V_clip = 1.5: max((3-4)^2, (1.5-4)^2) / 2 = 6.25 / 2
    tensor(3.1250)
    """
    keep = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros_like(values)
    # Differences are zeroed on pads before squaring, so a non-finite pad cannot reach the gradient.
    error = torch.where(keep, values - returns.detach(), zero)
    unclipped = error.square()
    if cliprange_value is None:
        worst = unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        step = torch.where(keep, values - old_values.detach(), zero)
        v_clipped_error = torch.where(
            keep,
            old_values.detach() + torch.clamp(step, -cliprange_value, cliprange_value) - returns.detach(),
            zero,
        )
        clipped = v_clipped_error.square()
        worst = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), keep).detach()
    loss = 0.5 * masked_mean(worst, keep)
    with torch.no_grad():
        metrics = {
            "loss/value": loss.detach(),
            "val/clipfrac": clipfrac,
            "val/vpred": masked_mean(values.detach(), keep),
            "val/error": masked_mean(unclipped.detach(), keep),
        }
    return LossOutput(loss, metrics)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution over the last dimension: ``H = logsumexp(z) - sum_v p_v z_v``.

    Apply it to one chunk of positions at a time to avoid holding ``(B, T, V)`` probabilities.
    Shapes: ``(..., V)`` -> ``(...)``.

    >>> entropy_from_logits(torch.zeros(1, 4))  # uniform over 4: log 4
    tensor([1.3863])
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    # p * z is taken as 0 where p = 0, so logits masked to -inf do not turn the entropy into nan.
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(probs))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over real tokens (the ``policy/entropy`` metric).

    Shapes: ``logits (B, T, V)``, ``mask (B, T)`` -> ``()``.
    """
    return masked_mean(entropy_from_logits(logits), mask)
