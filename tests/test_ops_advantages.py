"""Per-token rewards, returns and advantages, worked out by hand."""

from __future__ import annotations

import pytest
import torch

from hfrlhf.ops.advantages import (
    discounted_returns,
    gae,
    grpo_advantages,
    last_token_index,
    per_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from hfrlhf.ops.masked import masked_whiten


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    torch.testing.assert_close(last_token_index(mask), torch.tensor([2, 0, 3, -1]))
    torch.testing.assert_close(last_token_index(mask.bool()), torch.tensor([2, 0, 3, -1]))


def test_per_token_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, -0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    r = per_token_rewards(scores, kl, mask, beta=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.1, -0.15 + 2.0, 0.0],  # score on index 2, pad at 3 is 0 (its kl of 9 is ignored)
            [-0.25, 0.25, -0.5, -0.5 - 1.0],  # no padding: score on the last position
            [0.0, 0.0, 0.0, 0.0],  # empty response: nothing
        ]
    )
    torch.testing.assert_close(r, expected)
    # beta as a tensor (a controller's value) works the same
    torch.testing.assert_close(per_token_rewards(scores, kl, mask, torch.tensor(0.5)), expected)


def test_per_token_rewards_shape_checks():
    with pytest.raises(ValueError):
        per_token_rewards(torch.zeros(2), torch.zeros(3, 4), torch.ones(3, 4), 0.1)
    with pytest.raises(ValueError):
        per_token_rewards(torch.zeros(3), torch.zeros(3, 4), torch.ones(3, 5), 0.1)


def test_gae_1x3_step_by_step_with_pad():
    # One response of 3 slots, the last a pad: real tokens t=0, 1.
    rewards = torch.tensor([[1.0, 2.0, 100.0]])  # the pad's reward must be ignored
    values = torch.tensor([[0.5, 1.5, 100.0]])  # the pad's value must be ignored (no bootstrap from it)
    mask = torch.tensor([[1, 1, 0]])
    gamma, lam = 0.9, 0.8
    # t=1 (last real token): V_2 = 0 (after the end)
    delta1 = 2.0 + gamma * 0.0 - 1.5  # 0.5
    a1 = delta1  # 0.5, nothing after it
    # t=0: bootstrap from V_1 = 1.5
    delta0 = 1.0 + gamma * 1.5 - 0.5  # 1.85
    a0 = delta0 + gamma * lam * a1  # 1.85 + 0.72 * 0.5 = 2.21
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 1.5, 0.0]]))
    assert adv[0, 0].item() == pytest.approx(2.21)


def test_gae_batch_rows_are_independent_and_pads_do_not_matter():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    noisy_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    noisy_v = torch.where(mask.bool(), values, torch.full_like(values, -1e6))
    adv2, ret2 = gae(noisy_r, noisy_v, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)
    # row 2 has one token: A = r - V
    assert adv[2, 0].item() == pytest.approx((rewards[2, 0] - values[2, 0]).item())
    # row 1 alone gives the same as within the batch
    adv_row, _ = gae(rewards[1:2, :2], values[1:2, :2], torch.ones(1, 2), gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv[1:2, :2], adv_row)


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 3.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # G = [1 + 0.5*0 + 0.25*3, 0 + 0.5*3, 3] = [1.75, 1.5, 3]
    torch.testing.assert_close(ret, torch.tensor([[1.75, 1.5, 3.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.55, 1.1, 2.4, 0.0]]))
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), ret)


def test_rloo_by_hand():
    scores = torch.tensor([1.0, 3.0, 8.0, 2.0, 2.0, 2.0])  # P=2 prompts, k=3, prompt-major
    # prompt 0: 1 - (3+8)/2 = -4.5; 3 - (1+8)/2 = -1.5; 8 - (1+3)/2 = 6. prompt 1: all equal -> 0
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor([-4.5, -1.5, 6.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError, match="groups"):
        rloo_advantages(torch.zeros(5), 2)


def test_grpo_by_hand():
    scores = torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 1.0, 3.0, 5.0])
    # group (0, 2, 4, 1): mean 1.75, deviations -1.75, .25, 2.25, -.75; unbiased var = (3.0625+.0625+5.0625+.5625)/3
    std = ((3.0625 + 0.0625 + 5.0625 + 0.5625) / 3) ** 0.5
    # group (1, 1, 3, 5): mean 2.5, deviations -1.5, -1.5, .5, 2.5; unbiased var = (2.25+2.25+.25+6.25)/3
    std2 = ((2.25 + 2.25 + 0.25 + 6.25) / 3) ** 0.5
    expected = torch.tensor(
        [-1.75 / std, 0.25 / std, 2.25 / std, -0.75 / std, -1.5 / std2, -1.5 / std2, 0.5 / std2, 2.5 / std2]
    )
    torch.testing.assert_close(grpo_advantages(scores, 4, eps=0.0), expected)
    assert grpo_advantages(scores, 4)[2].item() == pytest.approx(2.25 / (std + 1e-4))
    torch.testing.assert_close(
        grpo_advantages(scores, 4, scale=False),
        torch.tensor([-1.75, 0.25, 2.25, -0.75, -1.5, -1.5, 0.5, 2.5]),
    )
    # a group with equal scores gets 0, not nan; k=1 gives 0
    torch.testing.assert_close(grpo_advantages(torch.tensor([3.0, 3.0]), 2), torch.zeros(2))
    torch.testing.assert_close(grpo_advantages(torch.tensor([3.0, 1.0]), 1), torch.zeros(2))


def test_grpo_matches_trl_normalisation():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(12, generator=g)
    grouped = scores.view(-1, 4)
    trl = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(grpo_advantages(scores, 4), trl.reshape(-1))


def test_reinforce_pp_by_hand():
    scores = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.2, 0.4, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    beta = 0.5
    # rewards: row0 [-0.1, -0.2 + 1, 0] ; row1 [-0.5, -0.5, -0.5 + 3]
    # returns (gamma=1): row0 [0.7, 0.8, 0] ; row1 [1.5, 2.0, 2.5]
    returns = torch.tensor([[0.7, 0.8, 0.0], [1.5, 2.0, 2.5]])
    adv, ret = reinforce_pp_advantages(scores, kl, mask, beta)
    torch.testing.assert_close(ret, returns)
    real = torch.tensor([0.7, 0.8, 1.5, 2.0, 2.5])
    whitened = (real - real.mean()) / real.var(unbiased=False).sqrt()
    torch.testing.assert_close(adv[mask.bool()], whitened)
    assert adv[0, 2].item() == 0.0


def test_reinforce_pp_baseline_variant():
    # k=2: scores (1, 3) -> (-1, 1) after the group mean; beta=0 -> the return is the centred score everywhere
    scores = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, ret = reinforce_pp_advantages(scores, torch.zeros(2, 2), mask, beta=0.0, k=2)
    torch.testing.assert_close(ret, torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))
    # real entries (-1, -1, 1): mean -1/3, biased std sqrt(8/9)
    torch.testing.assert_close(adv, masked_whiten(ret, mask))
    assert adv[1, 0].item() == pytest.approx((1 + 1 / 3) / (8 / 9) ** 0.5, rel=1e-6)
