"""From sequence scores and per-token KL to per-token rewards, returns and advantages.

Conventions shared by every function here:

- Responses are right-padded ``(B, T)`` tensors; ``mask`` (bool or 0/1) is True on real response tokens.
  A pad ends the trajectory: nothing after it is bootstrapped or accumulated, and every output is 0 on pads.
- Group layouts (``k`` samples per prompt) are *prompt-major*: the ``k`` samples of prompt ``p`` are the
  contiguous rows ``p*k .. p*k + k - 1``, i.e. ``scores.view(P, k)`` puts one prompt per row. This is the
  order a generation step produces with ``repeat_interleave(k)`` on the prompts (and TRL's RLOO/GRPO layout).
"""

from __future__ import annotations

import torch

from hfrlhf.ops.masked import AllReduce, masked_whiten


def _bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(P*k,) -> (P, k)``, refusing a batch that does not split into whole groups."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (P*k,), got shape {tuple(scores.shape)}")
    if k < 1 or scores.numel() % k != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of k={k}")
    return scores.view(-1, k)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, or -1 for a row with none.

    Taken as the largest position where the mask is set, so it is right whatever the padding side.
    Shapes: ``mask (B, T)`` -> ``(B,)`` long.

    >>> last_token_index(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]]))
    tensor([ 1,  2, -1])
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float | torch.Tensor
) -> torch.Tensor:
    """KL-shaped per-token rewards (Ziegler et al., 2019; Stiennon et al., 2020, eq. 1).

        r_t = -beta * KL_t + [t == last real token] * score,   r_t = 0 on pads.

    A row with no real token gets all-zero rewards (its score has nowhere to go).

    Args:
        scores: reward-model score of each response, ``(B,)``.
        kl: per-token KL estimate (see :func:`hfrlhf.ops.kl.kl_estimate`), ``(B, T)``.
        mask: real response tokens, ``(B, T)``.
        beta: KL coefficient (a float or a scalar tensor, e.g. a controller's ``value``).

    Returns:
        ``(B, T)`` rewards.

    >>> per_token_rewards(torch.tensor([1.0]), torch.tensor([[0.5, 0.5, 9.0]]), torch.tensor([[1, 1, 0]]), 0.1)
    tensor([[-0.0500,  0.9500,  0.0000]])
    """
    m = _bool_mask(mask, kl)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be ({kl.shape[0]},), got {tuple(scores.shape)}")
    positions = torch.arange(kl.shape[1], device=kl.device)
    at_last = positions.unsqueeze(0) == last_token_index(m).unsqueeze(1)  # (B, T), all False for empty rows
    rewards = -beta * kl + at_last.to(kl.dtype) * scores.to(kl.dtype).unsqueeze(1)
    return torch.where(m, rewards, torch.zeros_like(rewards))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}``, with ``G = 0`` after the last real token.

    Shapes: ``rewards``, ``mask`` ``(B, T)`` -> ``(B, T)`` (0 on pads).

    >>> discounted_returns(torch.tensor([[1.0, 2.0, 4.0, 7.0]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    tensor([[3., 4., 4., 0.]])
    """
    m = _bool_mask(mask, rewards)
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = torch.where(m[:, t], r[:, t] + gamma * running, torch.zeros_like(running))
        out[:, t] = running
    return out


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16), per token of a right-padded response.

        delta_t = r_t + gamma * V_{t+1} - V_t        (V_{t+1} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A = 0 after the last real token)
        R_t     = A_t + V_t                          (the value target)

    Rewards and values on pads are ignored, and both outputs are 0 there. Advantages are *not* whitened:
    pass them to :func:`hfrlhf.ops.masked.masked_whiten` as lm-human-preference-details does.

    Args:
        rewards: per-token rewards, e.g. from :func:`per_token_rewards`, ``(B, T)``.
        values: value-head predictions at the same tokens, ``(B, T)``.
        mask: real response tokens, ``(B, T)``.
        gamma: discount; lam: GAE's lambda.

    Returns:
        ``(advantages, returns)``, each ``(B, T)``.

    >>> adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2), 1.0, 1.0)
    >>> adv, ret
    (tensor([[0.5000, 0.5000]]), tensor([[1., 1.]]))
    """
    m = _bool_mask(mask, rewards)
    if values.shape != rewards.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match rewards {tuple(rewards.shape)}")
    zero = torch.zeros_like(rewards)
    r = torch.where(m, rewards, zero)
    v = torch.where(m, values, zero)
    next_v = torch.cat([v[:, 1:], zero[:, :1]], dim=1)  # 0 past the end and on pads
    next_real = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    delta = r + gamma * next_v - v
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = delta[:, t] + gamma * lam * torch.where(next_real[:, t], running, torch.zeros_like(running))
        adv[:, t] = running
    adv = torch.where(m, adv, zero)
    return adv, torch.where(m, adv + v, zero)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al., 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs").

        A_i = r_i - 1/(k-1) * sum_{j != i} r_j = k/(k-1) * (r_i - mean_j r_j)    within one prompt's group

    With ``k == 1`` there is no other sample to compare with and every advantage is 0.

    Shapes: ``scores (P*k,)`` prompt-major (module docstring) -> ``(P*k,)``.

    >>> rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 4.0]), k=3)
    tensor([-3.0000, -1.5000,  4.5000, -4.0000,  2.0000,  2.0000])
    """
    g = _groups(scores, k)
    if k == 1:
        return torch.zeros_like(scores)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al., 2024, "DeepSeekMath", Sec. 4.1.2, outcome supervision).

        A_i = (r_i - mean(group)) / (std(group) + eps)     or  r_i - mean(group)  with ``scale=False``

    ``std`` is the unbiased (Bessel-corrected) standard deviation of the group and ``eps = 1e-4``, as in TRL's
    GRPO/RLOO trainers. With ``k == 1`` every advantage is 0.

    Shapes: ``scores (P*k,)`` prompt-major (module docstring) -> ``(P*k,)``.

    >>> grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), k=3, eps=0.0)
    tensor([-1.,  0.,  1.,  0.,  0.,  0.])
    """
    g = _groups(scores, k)
    if k == 1:
        return torch.zeros_like(scores)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True, unbiased=True)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def reinforce_pp_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float | torch.Tensor,
    gamma: float = 1.0,
    k: int | None = None,
    all_reduce: AllReduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages (Hu et al., 2025, "REINFORCE++: Stabilizing Critic-Free Policy Optimization
    with Global Advantage Normalization", arXiv:2501.03262).

    1. With ``k`` (REINFORCE++ w/ baseline): subtract each prompt group's mean score,
       ``s_i <- s_i - mean(group)``; without it (REINFORCE++): scores as given.
    2. KL-shaped token rewards ``r_t = -beta KL_t + [t = last] s`` (:func:`per_token_rewards`).
    3. Reward-to-go ``G_t = sum_{t' >= t} gamma^{t'-t} r_t'`` (:func:`discounted_returns`).
    4. ``A = whiten(G)`` over every real token of the global batch (biased std, :func:`masked_whiten`).

    For the baseline variant as the paper runs it (KL as a loss term, not in the reward) pass ``beta=0``.

    Args:
        scores: ``(B,)``; with ``k``, prompt-major groups of ``k`` (module docstring).
        kl: per-token KL estimate ``(B, T)``; mask: real tokens ``(B, T)``.
        beta: KL coefficient; gamma: discount (1.0 in the paper).
        k: samples per prompt for the group-mean baseline, or None.
        all_reduce: callable summing a tensor over processes, so the whitening uses the global batch.

    Returns:
        ``(advantages, returns)``, each ``(B, T)``, 0 on pads.
    """
    if k is not None:
        g = _groups(scores, k)
        scores = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    returns = discounted_returns(per_token_rewards(scores, kl, mask, beta), mask, gamma)
    return masked_whiten(returns, mask, all_reduce=all_reduce), returns
