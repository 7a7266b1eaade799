"""Reward-model losses: scalar rewards in, loss and TRL-named metrics out.

Four data shapes, four losses (family ``"reward"``):

    bradley_terry   chosen, rejected (B,)                pairwise, TRL RewardTrainer's loss
    plackett_luce   rewards, scores, mask (P, K)         listwise, likelihood of the whole ranking
    all_pairs       rewards, scores, mask (P, K)         listwise, Bradley-Terry on every pair (InstructGPT)
    mse             pred, target (S,)                    pointwise regression onto a score

Metrics: ``accuracy`` and ``margin`` as TRL logs them (on every comparable pair for listwise data),
``min_reward``, ``mean_reward``, ``max_reward``; listwise adds ``kendall_tau`` and ``ndcg``.

>>> out = bradley_terry(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
>>> round(out.loss.item(), 4), out.metrics["accuracy"].item(), out.metrics["margin"].item()
(0.5032, 0.5, 0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hfrlhf.losses.base import LossOutput, register_loss
from hfrlhf.losses.listwise import plackett_luce_nll
from hfrlhf.losses.metrics import comparable_pairs, kendall_tau, ndcg, pairwise_accuracy, prompt_mean

__all__ = ["all_pairs", "bradley_terry", "mse", "plackett_luce"]


def _spread(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    r = rewards.detach()
    return {"min_reward": r.min(), "mean_reward": r.mean(), "max_reward": r.max()}


@register_loss("reward", "bradley_terry")
def bradley_terry(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    **_,
) -> LossOutput:
    """Bradley-Terry loss on reward pairs, with TRL's optional margin and reward centring.

    Bradley and Terry, 1952, "Rank analysis of incomplete block designs"; as a reward-model loss,
    Ouyang et al., 2022, "Training language models to follow instructions with human feedback", eq. 1.
    The margin ``m`` is Llama 2's (Touvron et al., 2023, eq. 2) and the centring term Eisenstein et al.,
    2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"::

        L = mean_i -log sigmoid(r_w,i - r_l,i - m_i)  +  c * mean_i (r_w,i + r_l,i)^2

    ``c = center_rewards_coefficient`` (no term when None), as TRL 1.16's ``RewardTrainer``.

    Shapes: ``chosen``, ``rejected``, ``margin`` ``(B,)``; returns a scalar ``()``. Metrics: ``accuracy``
    (fraction with ``r_w > r_l``), ``margin`` (mean ``r_w - r_l``), ``min/mean/max_reward`` over both.
    """
    diff = chosen - rejected
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    d = diff.detach()
    metrics = {"accuracy": (d > 0).float().mean(), "margin": d.mean(), **_spread(torch.cat([chosen, rejected]))}
    return LossOutput(loss, metrics)


def _listwise_metrics(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``accuracy``, ``margin`` (mean ``r_i - r_j`` over comparable pairs, per prompt then over prompts),
    reward spread over real slots, ``kendall_tau`` and ``ndcg``."""
    r = torch.where(mask, rewards.detach(), torch.zeros_like(rewards))
    pairs = comparable_pairs(scores, mask)
    gaps = torch.where(pairs, r.unsqueeze(-1) - r.unsqueeze(-2), torch.zeros(()).to(r)).sum(dim=(1, 2))
    n = pairs.sum(dim=(1, 2))
    return {
        "accuracy": pairwise_accuracy(r, scores, mask),
        "margin": prompt_mean(gaps / n.clamp(min=1), n > 0),
        **_spread(rewards[mask]),
        "kendall_tau": kendall_tau(r, scores, mask),
        "ndcg": ndcg(r, scores, mask),
    }


@register_loss("reward", "plackett_luce", listwise=True)
def plackett_luce(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, **_) -> LossOutput:
    """Plackett-Luce: negative log-likelihood of the labelled ranking under the rewards, mean over prompts.

    Plackett, 1975, "The analysis of permutations"; for the order ``s_(1) > ... > s_(n)`` of a prompt::

        L_p = -sum_{k=1}^{n-1} [ r_(k) - log sum_{m >= k} exp(r_(m)) ]

    Ties as in :func:`hfrlhf.losses.listwise.plackett_luce_nll`; the mean is over prompts with at least
    one pair. With ``K = 2`` this is :func:`bradley_terry`.

    Shapes: ``rewards``, ``scores``, ``mask`` ``(P, K)``; returns a scalar ``()``.
    """
    nll = plackett_luce_nll(rewards, scores, mask)
    has_pair = comparable_pairs(scores, mask).any(dim=(1, 2))
    return LossOutput(prompt_mean(nll, has_pair), _listwise_metrics(rewards, scores, mask))


@register_loss("reward", "all_pairs", listwise=True)
def all_pairs(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, **_) -> LossOutput:
    """Bradley-Terry on every pair of a prompt's responses, averaged per prompt, then over prompts.

    Ouyang et al., 2022, "Training language models to follow instructions with human feedback", eq. 1:
    all ``C(K, 2)`` comparisons of a prompt enter one batch element, each weighted ``1 / C(K, 2)``::

        L = mean_p  1/n_p * sum_{s_i > s_j} -log sigmoid(r_i - r_j)

    ``n_p`` is the prompt's number of pairs with different scores (``C(K_p, 2)`` without ties), so a
    prompt counts once whatever its ``K``; prompts with no such pair are left out.

    Shapes: ``rewards``, ``scores``, ``mask`` ``(P, K)``; returns a scalar ``()``.
    """
    r = torch.where(mask, rewards, torch.zeros_like(rewards))
    pairs = comparable_pairs(scores, mask)
    pair_loss = -F.logsigmoid(r.unsqueeze(-1) - r.unsqueeze(-2))  # (P, K, K), [p, i, j] for r_i - r_j
    n = pairs.sum(dim=(1, 2))
    per_prompt = torch.where(pairs, pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2)) / n.clamp(min=1)
    return LossOutput(prompt_mean(per_prompt, n > 0), _listwise_metrics(rewards, scores, mask))


@register_loss("reward", "mse", needs=("pointwise",))
def mse(pred: torch.Tensor, target: torch.Tensor, **_) -> LossOutput:
    """Pointwise regression of a reward onto a per-completion score (ChatLLaMA-style reward data)::

        L = mean_i (r_i - s_i)^2

    Shapes: ``pred``, ``target`` ``(S,)``; returns a scalar ``()``. Metrics: ``mae`` (mean ``|r - s|``)
    and the reward spread.
    """
    err = pred - target.to(pred.dtype)
    return LossOutput((err**2).mean(), {"mae": err.detach().abs().mean(), **_spread(pred)})
