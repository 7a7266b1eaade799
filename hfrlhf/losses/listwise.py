"""Listwise preference losses: each prompt has ``K >= 2`` scored responses instead of one pair.

A batch holds ``P`` prompts and up to ``K`` responses per prompt (prompts may have fewer; their missing
slots are False in ``mask``):

    policy.logps, policy.lengths   (P, K)   summed completion log-probs and token counts
    ref                            (P, K)   the same under the reference (None: uniform reference)
    scores                         (P, K)   labels, higher is better (ranks are given as -rank)
    mask                           (P, K)   bool, True for real responses

Missing slots affect nothing, gradients included: their inputs are replaced by 0 with ``torch.where``
before any arithmetic, so even a ``nan`` there never reaches the loss or the gradient.

Pairs are the ordered pairs ``(i, j)`` of one prompt with ``s_i > s_j`` (ties give no pair). Every loss is
a sum over a prompt's pairs or positions, averaged over the prompts that have at least one pair; with
``K = 2`` each reduces to a pairwise loss of :mod:`hfrlhf.losses.preference` (stated per loss, tested).

Metrics carry TRL's pairwise names, read on each prompt's best (``chosen``) and worst (``rejected``)
response by score: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``; ``rewards/accuracies`` is the fraction of all pairs the implicit rewards order right,
and ``rewards/kendall_tau``, ``rewards/ndcg`` (:mod:`hfrlhf.losses.metrics`) rate the whole order.

>>> from hfrlhf.losses import get_loss
>>> pol = ListLogps(torch.tensor([[-4.0, -6.0, -9.0]]), torch.tensor([[2, 3, 4]]))
>>> scores, mask = torch.tensor([[3.0, 2.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool)
>>> out = get_loss("preference", "pro").fn(pol, None, scores, mask, beta=1.0)
>>> round(out.loss.item(), 4), out.metrics["rewards/accuracies"].item()
(0.1814, 1.0)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hfrlhf.losses.base import LossOutput, register_loss
from hfrlhf.losses.metrics import comparable_pairs, kendall_tau, ndcg, pairwise_accuracy, prompt_mean

__all__ = [
    "ListLogps",
    "best_response_nll",
    "lipo_lambda_loss",
    "lipo_lambda_weights",
    "listwise_metrics",
    "plackett_luce_nll",
    "pro_loss",
    "rrhf_loss",
]


class ListLogps(NamedTuple):
    """Summed completion log-probs ``logps`` and token counts ``lengths`` of each prompt's responses, ``(P, K)``."""

    logps: torch.Tensor
    lengths: torch.Tensor

    def length_normalized(self, mask: torch.Tensor) -> torch.Tensor:
        """``log pi(y) / |y|`` ``(P, K)``, 0 on missing slots; lengths are clamped to at least 1."""
        logps = _real(self.logps, mask)
        lengths = torch.where(mask, self.lengths, torch.ones_like(self.lengths)).clamp(min=1)
        return logps / lengths.to(logps.dtype)


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with missing slots set to 0, so neither their values nor their gradients can leak."""
    return torch.where(mask, x, torch.zeros_like(x))


def _log_ratios(policy: ListLogps, ref: ListLogps | None, mask: torch.Tensor) -> torch.Tensor:
    """``h = log pi(y) - log pi_ref(y)`` ``(P, K)``, 0 on missing slots; no reference means log-prob 0."""
    h = _real(policy.logps, mask)
    return h if ref is None else h - _real(ref.logps, mask)


def _best_worst(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each prompt's highest and lowest score, ``(P,)`` each (ties: the first slot)."""
    s = torch.where(mask, scores, torch.zeros_like(scores))
    best = torch.where(mask, s, torch.full_like(s, float("-inf"))).argmax(dim=-1)
    worst = torch.where(mask, s, torch.full_like(s, float("inf"))).argmin(dim=-1)
    return best, worst


def _pick(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, slot.unsqueeze(-1)).squeeze(-1)


def listwise_metrics(
    rewards: torch.Tensor, policy: ListLogps, scores: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Detached metrics of implicit ``rewards`` ``(P, K)``; see the module docstring for the names.

    With ``K = 2`` they equal :func:`hfrlhf.losses.preference.reward_metrics` on the same pairs.
    """
    r = _real(rewards.detach(), mask)
    logps = _real(policy.logps.detach(), mask)
    best, worst = _best_worst(scores, mask)
    chosen, rejected = _pick(r, best), _pick(r, worst)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": pairwise_accuracy(r, scores, mask),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": _pick(logps, best).mean(),
        "logps/rejected": _pick(logps, worst).mean(),
        "rewards/kendall_tau": kendall_tau(r, scores, mask),
        "rewards/ndcg": ndcg(r, scores, mask),
    }


def plackett_luce_nll(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative Plackett-Luce log-likelihood of the score order under utilities ``values``, per prompt.

    Plackett, 1975, "The analysis of permutations"; Luce, 1959, "Individual Choice Behavior". For the
    order ``s_(1) > s_(2) > ... > s_(n)``::

        NLL = -sum_{k=1}^{n-1} [ v_(k) - log sum_{m >= k} exp(v_(m)) ]

    Ties in ``s`` are handled as Breslow (1974) does for tied event times: response ``i`` competes with
    every real response scored at most ``s_i`` (its tied partners too), and responses with nothing scored
    below them add no term. Without ties this is exactly the sum above::

        NLL = sum_{i : exists j, s_j < s_i}  [ log sum_{j : s_j <= s_i} exp(v_j) - v_i ]

    Shapes: ``values``, ``scores``, ``mask`` ``(P, K)``; returns ``(P,)`` (0 for a prompt with no pair).
    ``K = 2`` with ``s_1 > s_2`` gives ``-log sigmoid(v_1 - v_2)``.

    >>> plackett_luce_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2).bool())
    tensor([0.3133])
    """
    k = values.shape[-1]
    v = _real(values, mask)
    s = _real(scores, mask)
    eye = torch.eye(k, dtype=torch.bool, device=values.device)
    # competitors[p, i, j]: j is real and scored at most s_i; the diagonal keeps every row non-empty
    competitors = (mask.unsqueeze(-2) & (s.unsqueeze(-2) <= s.unsqueeze(-1))) | eye
    neg_inf = torch.full_like(v, float("-inf")).unsqueeze(-2).expand(-1, k, -1)
    log_denominator = torch.logsumexp(torch.where(competitors, v.unsqueeze(-2).expand(-1, k, -1), neg_inf), dim=-1)
    has_below = comparable_pairs(scores, mask).any(dim=-1)  # (P, K)
    return _real(log_denominator - v, has_below).sum(dim=-1)


@register_loss("preference", "pro", listwise=True)
def pro_loss(
    policy: ListLogps, ref: ListLogps | None, scores: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.1, **_
) -> LossOutput:
    """PRO: Plackett-Luce likelihood of the score order, on DPO's implicit rewards ``beta * h``.

    Song et al., 2024, "Preference Ranking Optimization for Human Alignment", its ranking objective
    (Sec. 3, the Plackett-Luce loss over prefixes of the ranking)::

        L = mean_p  sum_{k=1}^{n-1} -log [ exp(beta h_(k)) / sum_{m >= k} exp(beta h_(m)) ]

    Choice: the utilities are ``beta * (log pi - log pi_ref)``, the Plackett-Luce form of DPO (Rafailov et
    al., 2023, Appendix A.3), so the loss has DPO's KL-regularised optimum and, with ``K = 2``, equals
    :func:`hfrlhf.losses.preference.sigmoid_loss`. PRO itself scores with length-averaged policy
    log-probs and adds an SFT term; pass ``ref=None`` for a uniform reference, and add
    :func:`best_response_nll` in the trainer for the SFT term. Ties: :func:`plackett_luce_nll`.

    Shapes: see the module docstring; returns a scalar ``()``.
    """
    h = _log_ratios(policy, ref, mask)
    rewards = beta * h
    nll = plackett_luce_nll(rewards, scores, mask)
    has_pair = comparable_pairs(scores, mask).any(dim=(1, 2))
    return LossOutput(prompt_mean(nll, has_pair), listwise_metrics(rewards, policy, scores, mask))


@torch.no_grad()
def lipo_lambda_weights(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LiPO-lambda pair weights ``Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|``, no gradient.

    ``G = 2^s - 1`` is the gain of a label, ``tau`` the rank (1 = top) of a response when the prompt's real
    responses are sorted by ``rewards`` (ties: slot order) and ``D(tau) = log2(1 + tau)``.

    Shapes: ``(P, K)`` inputs; returns ``(P, K, K)`` (0 outside comparable pairs). With ``K = 2`` the one
    pair weighs ``(2^s_w - 2^s_l) (1 - 1/log2(3))``. Gains overflow float32 for scores above ~127.
    """
    k = rewards.shape[-1]
    r = _real(rewards, mask)
    slot = torch.arange(k, device=rewards.device)
    # tau_i = 1 + #{real j ranked above i}: higher reward, or equal reward and an earlier slot
    above = (r.unsqueeze(-2) > r.unsqueeze(-1)) | ((r.unsqueeze(-2) == r.unsqueeze(-1)) & (slot < slot.unsqueeze(-1)))
    tau = 1 + (above & mask.unsqueeze(-2)).sum(dim=-1)
    inv_discount = 1.0 / torch.log2(1.0 + tau.to(r.dtype))
    gain = torch.exp2(_real(scores, mask).to(r.dtype))  # the "-1" of G cancels in G_i - G_j
    weight = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)).abs()
    return _real(weight, comparable_pairs(scores, mask))


@register_loss("preference", "lipo", listwise=True)
def lipo_lambda_loss(
    policy: ListLogps, ref: ListLogps | None, scores: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.1, **_
) -> LossOutput:
    """LiPO-lambda: logistic loss on every pair, weighted by the pair's LambdaRank weight.

    Liu et al., 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank", the LiPO-lambda
    objective (LambdaLoss of Wang et al., 2018, on preference data), with the implicit rewards ``v = beta * h`` (DPO's) and weights from :func:`lipo_lambda_weights`::

        L = mean_p  sum_{s_i > s_j}  Delta_ij * -log sigmoid(v_i - v_j)

    The ranks ``tau`` in ``Delta`` follow the current rewards (LambdaLoss), without gradient.

    ``K = 2``: ``tau`` is {1, 2} whatever the order, so the one pair weighs
    ``c = (2^s_w - 2^s_l) (1 - 1/log2(3))`` and the loss is ``c`` times DPO's ``sigmoid`` loss on that
    pair; with scores 1 and 0, ``c = 1 - 1/log2(3) = 0.36907...``.

    Shapes: see the module docstring; returns a scalar ``()``.
    """
    h = _log_ratios(policy, ref, mask)
    rewards = beta * h
    pairs = comparable_pairs(scores, mask)
    weight = lipo_lambda_weights(rewards, scores, mask)
    pair_loss = -F.logsigmoid(rewards.unsqueeze(-1) - rewards.unsqueeze(-2))  # (P, K, K), finite everywhere
    per_prompt = _real(weight * pair_loss, pairs).sum(dim=(1, 2))
    return LossOutput(prompt_mean(per_prompt, pairs.any(dim=(1, 2))), listwise_metrics(rewards, policy, scores, mask))


def best_response_nll(policy: ListLogps, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of each prompt's best-scored response, averaged over prompts.

    ``NLL = mean_p -log pi(y_best,p) / |y_best,p|`` (ties: the first slot); with ``K = 2`` this is
    :func:`hfrlhf.losses.preference.chosen_nll`. Shapes: ``(P, K)`` inputs; returns a scalar ``()``.
    """
    best, _ = _best_worst(scores, mask)
    return -_pick(policy.length_normalized(mask), best).mean()


@register_loss("preference", "rrhf", listwise=True, reference_free=True)
def rrhf_loss(
    policy: ListLogps, ref: ListLogps | None, scores: torch.Tensor, mask: torch.Tensor, **_
) -> LossOutput:
    """RRHF: ranking hinge on length-normalised log-probs over all pairs, plus SFT on the best response.

    Yuan et al., 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback without
    tears", Sec. 3 (the ranking loss and the fine-tuning loss), with ``a = log pi(y) / |y|``::

        L = mean_p [ sum_{s_i > s_j} max(0, a_j - a_i)  -  a_best ]

    The SFT term is length-normalised (the paper writes the token sum), so both terms are per-token
    quantities. Reference-free; ``beta`` is not used. ``K = 2``:
    ``max(0, a_l - a_w) - a_w`` per pair. Rewards in the metrics are ``a``.

    Shapes: see the module docstring; returns a scalar ``()``.
    """
    a = policy.length_normalized(mask)
    pairs = comparable_pairs(scores, mask)
    hinge = _real(torch.relu(a.unsqueeze(-2) - a.unsqueeze(-1)), pairs).sum(dim=(1, 2))  # [p, i, j] = a_j - a_i
    best, _ = _best_worst(scores, mask)
    per_prompt = hinge - _pick(a, best)
    return LossOutput(prompt_mean(per_prompt, pairs.any(dim=(1, 2))), listwise_metrics(a, policy, scores, mask))
