"""Pairwise preference losses of the DPO family: one chosen and one rejected completion per prompt.

Every loss takes the policy's (and, unless it is reference-free, the reference's) summed completion
log-probs as a :class:`PairLogps` and returns the batch-mean loss plus detached metrics under the names
TRL logs. With ``ref=None`` a reference-based loss uses a uniform reference (log-prob 0 for every
completion), which is what ``reference_free=True`` means in a trainer.

Notation, for pair ``i`` of a batch of ``B`` (every tensor below is ``(B,)``):

    log pi(y)                      summed log-prob of a completion's tokens under the policy
    |y|                            its number of tokens
    h_w = log pi(y_w) - log pi_ref(y_w),  h_l = log pi(y_l) - log pi_ref(y_l)     log-ratios
    Delta = h_w - h_l

f-DPO: the losses built on the chosen-minus-rejected score (``sigmoid``, ``hinge``, ``ipo``, ``robust``,
``sigmoid_norm``, ``exo_pair``, ``discopop``) take ``f_divergence_type`` and ``f_alpha_divergence_coef`` and
use ``f_divergence_scores(h)`` in place of ``h`` in the loss (the logged rewards stay ``beta * h``, as in
TRL); the other reference-based losses refuse a divergence other than ``reverse_kl``.

Names and defaults of the hyperparameters follow TRL 1.16 where TRL has the loss (``beta``,
``label_smoothing`` of ``DPOConfig``; ``simpo_gamma``, ``cpo_alpha`` of the experimental ``CPOConfig``;
ORPO's lambda is ``beta`` as in TRL's ``ORPOConfig``). Each loss function ignores keyword arguments
it does not use, so a trainer can hand every loss the same dictionary.

>>> from hfrlhf.losses import get_loss
>>> pol = PairLogps(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
>>> ref = PairLogps(torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([2]), torch.tensor([3]))
>>> out = get_loss("preference", "sigmoid").fn(pol, ref, beta=0.5)
>>> round(out.loss.item(), 4), out.metrics["rewards/margins"].item()
(0.3133, 1.0)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hfrlhf.losses.base import LossOutput, register_loss

__all__ = [
    "PairLogps",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "chosen_nll",
    "discopop_loss",
    "F_DIVERGENCES",
    "f_divergence_scores",
    "exo_pair_loss",
    "hinge_loss",
    "ipo_loss",
    "nca_pair_loss",
    "orpo_loss",
    "rdpo_loss",
    "reward_metrics",
    "robust_loss",
    "sft_loss",
    "sigmoid_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "sppo_hard_loss",
]


class PairLogps(NamedTuple):
    """Summed completion log-probs and token counts of chosen/rejected pairs.

    Fields (each ``(B,)``): ``chosen``, ``rejected`` (summed log-probs of the completion tokens),
    ``chosen_len``, ``rejected_len`` (number of completion tokens; any numeric dtype).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor

    def length_normalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean log-prob per token ``(log pi(y_w) / |y_w|, log pi(y_l) / |y_l|)``, each ``(B,)``.

        Lengths are clamped to at least 1, as TRL does, so an empty completion gives 0 rather than nan.
        """
        return (self.chosen / self.chosen_len.clamp(min=1).to(self.chosen.dtype),
                self.rejected / self.rejected_len.clamp(min=1).to(self.rejected.dtype))


def _log_ratios(policy: PairLogps, ref: PairLogps | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_w, h_l)``, each ``(B,)``; a missing reference is uniform (log-prob 0)."""
    if ref is None:
        return policy.chosen, policy.rejected
    return policy.chosen - ref.chosen, policy.rejected - ref.rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(
    h: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """What f-DPO puts where DPO has the log-ratio ``h``: ``f'(u)`` at ``u = pi / pi_ref = exp(h)``.

    Wang et al., 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", Thm. 1: regularising with an f-divergence ``D_f(pi || pi_ref)`` instead of the
    reverse KL makes the implicit reward ``beta f'(u)`` (up to a constant that cancels between chosen and
    rejected). The forms, as TRL 1.16's ``f_divergence_type`` computes them (``a = f_alpha_divergence_coef``)::

        reverse_kl         h                                  (DPO)
        forward_kl         1 - exp(-h)
        js_divergence      log 2 + log sigmoid(h)
        alpha_divergence   (exp((a - 1) h) - 1) / (a - 1),    a = 1 gives h

    For the alpha-divergence the exponent is clamped at 80 (11 in float16), as TRL does, so it stays finite.
    Shape: any; returns the same shape.
    """
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-h)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(h)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return h
        ceiling = 11.0 if h.dtype == torch.float16 else 80.0
        t = ((a - 1.0) * h).float().clamp(max=ceiling)
        return (torch.expm1(t) / (a - 1.0)).to(h.dtype)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {list(F_DIVERGENCES)}")


def _scores(h_w: torch.Tensor, h_l: torch.Tensor, f_type: str, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    return f_divergence_scores(h_w, f_type, coef), f_divergence_scores(h_l, f_type, coef)


def _reverse_kl_only(name: str, f_divergence_type: str) -> None:
    """Losses not built on the chosen-minus-rejected score have no f-divergence form (TRL refuses them too)."""
    if f_divergence_type != "reverse_kl":
        raise ValueError(f"{name} has no f-divergence generalisation; use f_divergence_type='reverse_kl'")


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: binary cross-entropy with soft label ``1 - eps``."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def reward_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy: PairLogps
) -> dict[str, torch.Tensor]:
    """TRL's pairwise metrics, batch means, detached.

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (mean of chosen - rejected),
    ``rewards/accuracies`` (fraction with chosen > rejected, ties count as wrong), ``logps/chosen``,
    ``logps/rejected`` (mean summed log-probs of the policy). Inputs are ``(B,)``.
    """
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "rewards/margins": (c - r).mean(),
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
    }


def _dpo_output(
    per_pair: torch.Tensor, h_w: torch.Tensor, h_l: torch.Tensor, policy: PairLogps, beta: float
) -> LossOutput:
    """Mean loss and metrics with DPO's implicit rewards ``beta * h``."""
    return LossOutput(per_pair.mean(), reward_metrics(beta * h_w, beta * h_l, policy))


def chosen_nll(policy: PairLogps, *, token_level: bool = False) -> torch.Tensor:
    """Negative log-likelihood of the chosen completions, the SFT term a trainer adds with weight ``rpo_alpha``.

    Default (per sequence, the length-normalised NLL of RPO: Pang et al., 2024, "Iterative Reasoning
    Preference Optimization", Sec. 2)::

        NLL = 1/B * sum_i  -log pi(y_w,i) / |y_w,i|

    With ``token_level=True``, the mean over all chosen tokens of the batch (every token weighs the same),
    which is the cross-entropy TRL's CPO and ORPO trainers add, and its ``sft`` loss type::

        NLL = -sum_i log pi(y_w,i) / sum_i |y_w,i|

    Shapes: ``policy`` fields ``(B,)``; returns a scalar ``()`` with gradient.

    >>> chosen_nll(PairLogps(torch.tensor([-2.0, -9.0]), torch.tensor([0.0, 0.0]), torch.tensor([1, 3]),
    ...                      torch.tensor([1, 1])))
    tensor(2.5000)
    >>> chosen_nll(PairLogps(torch.tensor([-2.0, -9.0]), torch.tensor([0.0, 0.0]), torch.tensor([1, 3]),
    ...                      torch.tensor([1, 1])), token_level=True)
    tensor(2.7500)
    """
    if token_level:
        return -policy.chosen.sum() / policy.chosen_len.sum().clamp(min=1).to(policy.chosen.dtype)
    return -policy.length_normalized()[0].mean()


@register_loss("preference", "sigmoid")
def sigmoid_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_
) -> LossOutput:
    """DPO: logistic loss on the difference of implicit rewards, optionally conservative (cDPO).

    Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", eq. 7; label smoothing ``eps`` as in Mitchell, 2023, "A note on DPO with noisy preferences &
    relationship to IPO" (cDPO), where a label is flipped with probability ``eps``::

        L = -(1 - eps) log sigmoid(beta * Delta) - eps log sigmoid(-beta * Delta)

    With ``eps = 0`` this is TRL 1.16's ``sigmoid`` loss; TRL 1.16's DPO trainer ignores
    ``label_smoothing`` for ``sigmoid``, and its CPO trainer and earlier TRL releases use this cDPO form.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    return _dpo_output(_smoothed_logistic(beta * (s_w - s_l), label_smoothing), h_w, h_l, policy, beta)


@register_loss("preference", "hinge")
def hinge_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_) -> LossOutput:
    """SLiC's calibration hinge on DPO's log-ratio margin, as TRL's ``hinge`` loss.

    Zhao et al., 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", eq. 1, with the
    margin ``delta = 1 / beta`` and log-ratios to the reference in place of raw log-probs::

        L = max(0, 1 - beta * Delta)

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    return _dpo_output(torch.relu(1 - beta * (s_w - s_l)), h_w, h_l, policy, beta)


@register_loss("preference", "ipo")
def ipo_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_) -> LossOutput:
    """IPO: squared regression of the per-token log-ratio margin onto ``1 / (2 tau)``, with ``tau = beta``.

    Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17. As in TRL 1.16 the log-ratios are averaged over each completion's tokens (a form the IPO
    authors confirmed to TRL), so ``beta`` does not depend on completion length::

        L = (h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``
    (summed log-ratios, as TRL logs them).
    """
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    c_len = policy.chosen_len.clamp(min=1).to(h_w.dtype)
    r_len = policy.rejected_len.clamp(min=1).to(h_l.dtype)
    per_pair = (s_w / c_len - s_l / r_len - 1 / (2 * beta)) ** 2
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "robust")
def robust_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_
) -> LossOutput:
    """Robust DPO: an unbiased estimate of the DPO loss when labels are flipped with probability ``eps``.

    Chowdhury et al., 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", the
    de-biased loss of Sec. 3::

        L = ((1 - eps) * -log sigmoid(beta * Delta) - eps * -log sigmoid(-beta * Delta)) / (1 - 2 eps)

    ``eps = label_smoothing`` must lie in ``[0, 0.5)``; ``eps = 0`` is DPO.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_w - s_l)
    per_pair = ((1 - label_smoothing) * -F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "rdpo")
def rdpo_loss(
    policy: PairLogps,
    ref: PairLogps | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rdpo_alpha: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    **_,
) -> LossOutput:
    """R-DPO: DPO with a length penalty ``alpha |y|`` in the RL objective, so length is not learnt as quality.

    Park et al., 2024, "Disentangling Length from Quality in Direct Preference Optimization", Sec. 4.
    Maximising ``E[r(x, y) - alpha |y|] - beta KL`` makes the reward ``r = beta h + alpha |y|`` (up to a
    prompt constant), so the Bradley-Terry logit gains ``alpha (|y_w| - |y_l|)``::

        L = -log sigmoid(beta * Delta + alpha * (|y_w| - |y_l|))

    (with cDPO label smoothing as in :func:`sigmoid_loss`). A pair whose chosen completion is longer gets
    a larger logit, hence a smaller gradient: its preference is partly explained by length. ``alpha =
    rdpo_alpha >= 0``; ``alpha = 0`` is DPO. TRL 1.16 has no R-DPO.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("rdpo", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    length_gap = (policy.chosen_len - policy.rejected_len).to(h_w.dtype)
    z = beta * (h_w - h_l) + rdpo_alpha * length_gap
    return _dpo_output(_smoothed_logistic(z, label_smoothing), h_w, h_l, policy, beta)


@register_loss("preference", "simpo", reference_free=True)
def simpo_loss(
    policy: PairLogps,
    ref: PairLogps | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 0.0,
    **_,
) -> LossOutput:
    """SimPO: reference-free, length-normalised reward ``beta * log pi(y) / |y|`` with a target margin gamma.

    Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6, in
    the form of TRL's CPO trainer (``loss_type="simpo"``): cDPO label smoothing and an optional token-level
    NLL on the chosen completions (CPO-SimPO) with weight ``cpo_alpha``::

        a_w = log pi(y_w) / |y_w|,   a_l = log pi(y_l) / |y_l|,   z = beta (a_w - a_l) - gamma
        L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)  +  cpo_alpha * NLL_token(y_w)

    ``gamma = simpo_gamma`` (TRL's default 0.5). ``cpo_alpha`` defaults to 0 here, pure SimPO; TRL's
    ``CPOConfig`` defaults it to 1. ``ref`` is ignored. The paper's ``beta`` is typically 2 to 2.5.

    Shapes: ``PairLogps`` fields ``(B,)``; returns a scalar. Rewards are ``beta * a``; ``nll_loss`` is
    logged when ``cpo_alpha != 0``.
    """
    a_w, a_l = policy.length_normalized()
    per_pair = _smoothed_logistic(beta * (a_w - a_l) - simpo_gamma, label_smoothing)
    loss = per_pair.mean()
    metrics = reward_metrics(beta * a_w, beta * a_l, policy)
    if cpo_alpha:
        nll = chosen_nll(policy, token_level=True)
        loss = loss + cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return LossOutput(loss, metrics)


_MINUS_LN2 = -math.log(2.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x`` (Maechler, 2012)."""
    # both branches are finite for x < 0, so torch.where cannot route a nan into the gradient
    return torch.where(x > _MINUS_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_loss("preference", "orpo", reference_free=True)
def orpo_loss(policy: PairLogps, ref: PairLogps | None = None, *, beta: float = 0.1, **_) -> LossOutput:
    """ORPO: NLL on the chosen completion plus a log odds-ratio penalty, without a reference model.

    Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4-7, with
    the per-token mean log-probs ``a = log pi(y) / |y|`` as probabilities ``P = exp(a)``::

        log odds(y) = a - log(1 - exp(a))
        L = NLL_token(y_w) - lambda * mean_i log sigmoid(log odds(y_w) - log odds(y_l))

    ``lambda = beta``, as TRL's ``ORPOConfig`` names it. ``NLL_token`` is the mean over all chosen
    completion tokens of the batch (:func:`chosen_nll` with ``token_level=True``); TRL's ORPO trainer takes
    that cross-entropy over the prompt tokens as well, which completion log-probs cannot reproduce. Computed
    in float32. ``ref`` is ignored.

    Shapes: ``PairLogps`` fields ``(B,)``; returns a scalar. Rewards are ``beta * a``; also logs
    ``nll_loss``, ``log_odds_ratio`` (mean log sigmoid term) and ``log_odds_chosen`` (mean log odds-ratio).
    """
    a_w, a_l = (a.float() for a in policy.length_normalized())
    log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(policy, token_level=True).float()
    metrics = reward_metrics(beta * a_w, beta * a_l, policy)
    metrics.update(nll_loss=nll.detach(), log_odds_ratio=ratio.detach().mean(), log_odds_chosen=log_odds.detach().mean())
    return LossOutput(nll - beta * ratio.mean(), metrics)


# --- losses on each completion's own log-ratio, not only on the margin --------------------------------------
@register_loss("preference", "sigmoid_norm")
def sigmoid_norm_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_
) -> LossOutput:
    """Length-normalised DPO: the logistic loss on per-token log-ratios, so long answers gain no extra margin.

    Lambert et al., 2024, "Tulu 3: Pushing Frontiers in Open Language Model Post-Training", Sec. 5
    (``dpo_norm``); TRL's ``sigmoid_norm``. With cDPO label smoothing as in :func:`sigmoid_loss`::

        z = beta * (h_w / |y_w| - h_l / |y_l|)
        L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

    Per-token log-ratios are small, so ``beta`` is typically much larger than for DPO (Tulu 3 uses 5).

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``
    (summed log-ratios, as TRL logs them).
    """
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    c_len = policy.chosen_len.clamp(min=1).to(h_w.dtype)
    r_len = policy.rejected_len.clamp(min=1).to(h_l.dtype)
    per_pair = _smoothed_logistic(beta * (s_w / c_len - s_l / r_len), label_smoothing)
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "exo_pair")
def exo_pair_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_
) -> LossOutput:
    """EXO (pairwise): reverse KL from the model's preference distribution to a smoothed label.

    Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16 with K = 2.
    The policy's preference for the chosen completion is ``q_w = sigmoid(beta * Delta)`` (``q_l = 1 - q_w``),
    the target puts ``1 - eps`` on the chosen one::

        L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)      = KL(q || (1 - eps, eps))

    Unlike DPO's forward KL it is mode-seeking: once ``q_w`` is past ``1 - eps`` the gradient pushes it back.
    ``eps = label_smoothing`` must lie in ``(0, 1)``; the paper uses ``1e-3``. TRL 1.16 refuses ``eps = 0``
    in its config; this function does too.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the paper uses 1e-3), got {label_smoothing}")
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_w - s_l)
    log_q_w, log_q_l = F.logsigmoid(z), F.logsigmoid(-z)
    per_pair = log_q_w.exp() * (log_q_w - math.log1p(-label_smoothing)) + log_q_l.exp() * (
        log_q_l - math.log(label_smoothing)
    )
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "nca_pair")
def nca_pair_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", **_) -> LossOutput:
    """NCA (pairwise): noise-contrastive alignment, which scores each completion on its own.

    Chen et al., 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", the NCA loss
    with K = 2 and binary preferences; TRL's ``nca_pair``. With ``r = beta * h``::

        L = -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)

    The chosen reward is pulled toward positive values and both are pushed away from large rewards, so the
    chosen likelihood does not fall the way it can under DPO, whose loss sees only the margin.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("nca_pair", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    r_w, r_l = beta * h_w, beta * h_l
    per_pair = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "bco_pair")
def bco_pair_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", **_) -> LossOutput:
    """BCO (pairwise): a binary classifier on implicit rewards, chosen as class 1 and rejected as class 0.

    Jung et al., 2024, "Binary Classifier Optimization for Large Language Model Alignment", eq. 9 applied to
    both completions of a pair, without the paper's running-mean reward shift ``delta`` (as TRL 1.16's
    ``bco_pair``, which also has no shift). With ``r = beta * h``::

        L = -log sigmoid(r_w) - log sigmoid(-r_l)

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("bco_pair", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    per_pair = -F.logsigmoid(beta * h_w) - F.logsigmoid(-beta * h_l)
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "sppo_hard")
def sppo_hard_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", **_) -> LossOutput:
    """SPPO with hard labels: regress each log-ratio onto +-1/(2 beta).

    Wu et al., 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.7 (Algorithm 1)
    with the win probability set to 1 for the chosen and 0 for the rejected completion (the paper estimates
    it with a preference model; this is TRL's ``sppo_hard``). With ``eta = 1 / beta``::

        L = (h_w - eta/2)^2 + (h_l + eta/2)^2

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("sppo_hard", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    half = 0.5 / beta
    per_pair = (h_w - half) ** 2 + (h_l + half) ** 2
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "apo_zero")
def apo_zero_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", **_) -> LossOutput:
    """APO-zero: raise the chosen likelihood and lower the rejected one, each anchored at the reference.

    D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", eq. 7 (shifted by 1 to be non-negative, as TRL's ``apo_zero``). For
    data whose chosen answers are better than what the model writes now::

        L = (1 - sigmoid(beta * h_w)) + sigmoid(beta * h_l)

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("apo_zero", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    per_pair = torch.sigmoid(-beta * h_w) + torch.sigmoid(beta * h_l)  # 1 - s(x) = s(-x)
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "apo_down")
def apo_down_loss(policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, f_divergence_type: str = "reverse_kl", **_) -> LossOutput:
    """APO-down: lower both likelihoods, the rejected one more, for chosen answers worse than the model's own.

    D'Oosterlinck et al., 2024 (see :func:`apo_zero_loss`), eq. 8, shifted by 1 as TRL's ``apo_down``::

        L = sigmoid(beta * h_w) + (1 - sigmoid(beta * (h_w - h_l)))

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("apo_down", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    per_pair = torch.sigmoid(beta * h_w) + torch.sigmoid(-beta * (h_w - h_l))
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


@register_loss("preference", "discopop")
def discopop_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, **_
) -> LossOutput:
    """DiscoPOP: a blend of the logistic (DPO) and exponential losses, weighted by the margin itself.

    Lu et al., 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    eq. 5 (the log-ratio modulated loss found by LLM-driven search); TRL's ``discopop``. With
    ``z = beta * Delta`` and ``w = sigmoid(z / tau)``::

        L = (1 - w) * -log sigmoid(z) + w * exp(-z)

    ``tau = discopop_tau`` (the paper's 0.05; ``DPOConfig.discopop_tau``). The exponential
    term is computed as ``exp(-z + log sigmoid(z / tau))``, the same number, which stays finite for very
    negative margins where ``exp(-z)`` alone overflows (``tau < 1``).

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    h_w, h_l = _log_ratios(policy, ref)
    s_w, s_l = _scores(h_w, h_l, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_w - s_l)
    w = torch.sigmoid(z / discopop_tau)
    per_pair = -F.logsigmoid(z) * (1 - w) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return _dpo_output(per_pair, h_w, h_l, policy, beta)


# --- AOT: distributional alignment over the batch -------------------------------------------------------------
def _aot_output(
    sorted_gap: torch.Tensor, h_w: torch.Tensor, h_l: torch.Tensor, policy: PairLogps, beta: float, eps: float
) -> LossOutput:
    return _dpo_output(_smoothed_logistic(beta * sorted_gap, eps), h_w, h_l, policy, beta)


@register_loss("preference", "aot")
def aot_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", **_
) -> LossOutput:
    """AOT (paired): first-order stochastic dominance of the policy's chosen-vs-rejected log-odds over the reference's.

    Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", the paired
    form; TRL's ``aot``. The one-dimensional optimal transport plan between two empirical distributions
    matches them in sorted order, so with ``u_i = log pi(y_w,i) - log pi(y_l,i)``, ``v_i`` the same under
    the reference, and ``sort`` ascending over the batch::

        L = mean_j [ -(1 - eps) log sigmoid(beta d_j) - eps log sigmoid(-beta d_j) ],  d = sort(u) - sort(v)

    The loss couples the pairs of a micro-batch, so unlike the other losses it changes with how a batch is
    split (gradient accumulation, several processes); it needs batches of more than a few pairs.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("aot", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    u = policy.chosen - policy.rejected
    v = torch.zeros_like(u) if ref is None else ref.chosen - ref.rejected
    gap = torch.sort(u, dim=0).values - torch.sort(v, dim=0).values
    return _aot_output(gap, h_w, h_l, policy, beta, label_smoothing)


@register_loss("preference", "aot_unpaired")
def aot_unpaired_loss(
    policy: PairLogps, ref: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl", **_
) -> LossOutput:
    """AOT (unpaired): the chosen log-ratios' distribution should dominate the rejected ones'.

    Melnyk et al., 2024 (see :func:`aot_loss`), the unpaired form, for data where chosen and rejected
    completions need not share a prompt; TRL 1.16's ``aot_unpaired`` (``aot_pair`` in earlier TRL)::

        d = sort(h_w) - sort(h_l),   L = mean_j [ -(1 - eps) log sigmoid(beta d_j) - eps log sigmoid(-beta d_j) ]

    Batch-coupled like :func:`aot_loss`.

    Shapes: ``PairLogps`` fields ``(B,)``; returns the mean over the batch. Rewards are ``beta * h``.
    """
    _reverse_kl_only("aot_unpaired", f_divergence_type)
    h_w, h_l = _log_ratios(policy, ref)
    gap = torch.sort(h_w, dim=0).values - torch.sort(h_l, dim=0).values
    return _aot_output(gap, h_w, h_l, policy, beta, label_smoothing)


@register_loss("preference", "sft", reference_free=True)
def sft_loss(policy: PairLogps, ref: PairLogps | None = None, *, beta: float = 0.1, **_) -> LossOutput:
    """Supervised fine-tuning on the chosen completions only: their mean token NLL; TRL's ``sft`` loss type.

    Mostly useful combined with a preference loss, e.g. MPO (Wang et al., 2024, "Enhancing the Reasoning
    Ability of Multimodal Large Language Models via Mixed Preference Optimization"):
    ``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]``::

        L = -sum_i log pi(y_w,i) / sum_i |y_w,i|

    Reference-free; when a reference is given it only enters the logged rewards (``beta * h``, else
    ``beta * log pi``). Also logs ``nll_loss``.

    Shapes: ``PairLogps`` fields ``(B,)``; returns a scalar.
    """
    h_w, h_l = _log_ratios(policy, ref)
    nll = chosen_nll(policy, token_level=True)
    metrics = reward_metrics(beta * h_w, beta * h_l, policy)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(nll, metrics)
