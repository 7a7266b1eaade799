"""Ranking metrics for listwise batches: how well predicted values order each prompt's responses.

A listwise batch holds ``P`` prompts with up to ``K`` responses each:

    values  (P, K) float   what a model predicts (reward, implicit reward, log-prob); higher = better
    scores  (P, K) float   the data's labels; higher = better
    mask    (P, K) bool    False for missing slots (prompts may have fewer than K responses)

Missing slots never influence a result, whatever they hold (``nan`` included). Every metric is computed
per prompt and then averaged over the prompts where it is defined; all are detached (no gradient).

>>> values = torch.tensor([[0.3, 0.1, 0.2]])
>>> scores = torch.tensor([[3.0, 1.0, 2.0]])
>>> mask = torch.ones(1, 3, dtype=torch.bool)
>>> kendall_tau(values, scores, mask).item(), ndcg(values, scores, mask).item()
(1.0, 1.0)
"""

from __future__ import annotations

import torch

__all__ = ["comparable_pairs", "kendall_tau", "ndcg", "pairwise_accuracy", "prompt_mean"]


def comparable_pairs(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ordered pairs ``(i, j)`` of one prompt where response ``i`` is labelled better than ``j``.

    Shapes: ``scores``, ``mask`` ``(P, K)``; returns ``(P, K, K)`` bool, ``[p, i, j] = m_i and m_j and
    s_i > s_j``. Ties give no pair.

    >>> comparable_pairs(torch.tensor([[2.0, 1.0, 2.0]]), torch.tensor([[True, True, False]])).int()
    tensor([[[0, 1, 0],
             [0, 0, 0],
             [0, 0, 0]]], dtype=torch.int32)
    """
    s = torch.where(mask, scores, torch.zeros_like(scores))
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return both & (s.unsqueeze(-1) > s.unsqueeze(-2))


def prompt_mean(per_prompt: torch.Tensor, defined: torch.Tensor, empty: float = 0.0) -> torch.Tensor:
    """Mean of ``per_prompt`` ``(P,)`` over prompts where ``defined`` ``(P,)`` is True; ``empty`` if none is.

    With none defined (a batch of listwise rows whose scores all tie) the result is still a function of
    ``per_prompt``, with zero gradient, so a loss built on it can be backpropagated (a step that learns nothing)
    instead of failing in ``backward``.
    """
    kept = torch.where(defined, per_prompt, torch.zeros_like(per_prompt))
    n = defined.sum()
    if n == 0:
        return kept.sum() + empty  # exactly `empty`: every kept value is 0
    return kept.sum() / n


@torch.no_grad()
def pairwise_accuracy(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of comparable pairs the values order correctly, per prompt, then averaged over prompts.

    ``acc_p = #{(i, j): s_i > s_j, v_i > v_j} / #{(i, j): s_i > s_j}`` (a tie in ``v`` counts as wrong,
    as TRL's ``rewards/accuracies``). With ``K = 2`` this is ``(v_chosen > v_rejected)`` averaged.

    Shapes: ``(P, K)`` inputs; returns a scalar ``()``.

    >>> pairwise_accuracy(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 2.0, 1.0]]), torch.ones(1, 3).bool())
    tensor(0.6667)
    """
    pairs = comparable_pairs(scores, mask)
    v = torch.where(mask, values, torch.zeros_like(values)).float()
    right = (pairs & (v.unsqueeze(-1) > v.unsqueeze(-2))).sum(dim=(1, 2))
    n = pairs.sum(dim=(1, 2))
    return prompt_mean(right / n.clamp(min=1), n > 0)


@torch.no_grad()
def kendall_tau(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between values and scores, per prompt, averaged over the prompts where it is defined.

    Kendall, 1945, "The treatment of ties in ranking problems"; over the unordered pairs ``i < j`` of a
    prompt's real responses, with ``a = sign(v_i - v_j)``, ``b = sign(s_i - s_j)``::

        tau_b = sum a*b / sqrt((n0 - n_v) (n0 - n_s))

    where ``n0`` is the number of pairs and ``n_v``, ``n_s`` the pairs tied in ``v``, in ``s``. This is
    the variant ``scipy.stats.kendalltau`` computes by default. A prompt where all values or all scores
    are tied has no tau and is left out; 0 if no prompt has one.

    Shapes: ``(P, K)`` inputs; returns a scalar ``()`` in ``[-1, 1]``.

    >>> kendall_tau(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]]), torch.ones(1, 3).bool())
    tensor(0.3333)
    """
    k = values.shape[-1]
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    upper = torch.ones(k, k, dtype=torch.bool, device=values.device).triu(diagonal=1)
    pairs = both & upper  # (P, K, K): unordered pairs of real responses
    v = torch.where(mask, values, torch.zeros_like(values)).double()
    s = torch.where(mask, scores, torch.zeros_like(scores)).double()
    a = torch.sign(v.unsqueeze(-1) - v.unsqueeze(-2))
    b = torch.sign(s.unsqueeze(-1) - s.unsqueeze(-2))
    zero = torch.zeros_like(a)
    concord = torch.where(pairs, a * b, zero).sum(dim=(1, 2))
    n0 = pairs.sum(dim=(1, 2)).double()
    untied_v = n0 - (pairs & (a == 0)).sum(dim=(1, 2))
    untied_s = n0 - (pairs & (b == 0)).sum(dim=(1, 2))
    denom = (untied_v * untied_s).sqrt()
    defined = denom > 0
    tau = concord / torch.where(defined, denom, torch.ones_like(denom))
    return prompt_mean(tau, defined).to(values.dtype if values.is_floating_point() else torch.float32)


@torch.no_grad()
def ndcg(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Normalised discounted cumulative gain of the order the values induce, per prompt, averaged.

    Jarvelin and Kekalainen, 2002, "Cumulated gain-based evaluation of IR techniques". Responses are
    sorted by ``v`` (descending; ties keep slot order) and the one at position ``n = 1, 2, ...`` gains
    ``g = s - min(s)``, the score above the prompt's worst, so gains are non-negative and the metric does
    not change when all scores shift (``scores = -rank`` works)::

        DCG@k = sum_{n <= k} g_(n) / log2(n + 1),     NDCG@k = DCG@k / DCG@k of the order by s

    ``k = None`` uses every response. A prompt whose scores are all tied has no NDCG and is left out;
    1 if no prompt has one.

    Shapes: ``(P, K)`` inputs; returns a scalar ``()`` in ``[0, 1]``.

    >>> ndcg(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]]), torch.ones(1, 3).bool())
    tensor(0.6199)
    """
    p, kk = values.shape
    s = torch.where(mask, scores, torch.full_like(scores, float("inf"))).double()
    worst = s.min(dim=-1, keepdim=True).values
    gains = torch.where(mask, s - worst, torch.zeros_like(s))  # (P, K) >= 0, 0 on missing slots
    n_real = mask.sum(dim=-1, keepdim=True)
    cutoff = n_real if k is None else n_real.clamp(max=k)
    position = torch.arange(kk, device=values.device).expand(p, kk)
    discount = torch.where(position < cutoff, 1.0 / torch.log2(position.double() + 2.0), torch.zeros(()).double())

    v = torch.where(mask, values.double(), torch.full_like(values, float("-inf"), dtype=torch.float64))
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices  # missing slots go last
    ideal = torch.sort(gains, dim=-1, descending=True).values
    dcg = (gains.gather(-1, order) * discount).sum(-1)
    idcg = (ideal * discount).sum(-1)
    defined = idcg > 0
    out = dcg / torch.where(defined, idcg, torch.ones_like(idcg))
    return prompt_mean(out, defined, empty=1.0).to(values.dtype if values.is_floating_point() else torch.float32)
