"""PPO's clipped policy and value losses, worked out token by token."""

from __future__ import annotations

import math

import pytest
import torch

from hfrlhf.losses.ppo import entropy_from_logits, masked_entropy, policy_loss, value_loss

MASK = torch.tensor([[1, 1, 1, 0]])


def test_policy_loss_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0, float("-inf")]])
    logp = (old + torch.tensor([[math.log(1.5), math.log(0.5), 0.0, 0.0]])).clone()
    logp[0, 3] = float("-inf")  # pads may hold anything
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, float("nan")]])
    out = policy_loss(logp, old, adv, MASK, cliprange=0.2)
    # t0: rho 1.5, A  1: max(-1.5, -1.2) = -1.2  (clipped term used)
    # t1: rho 0.5, A -1: max( 0.5,  0.8) =  0.8  (clipped term used)
    # t2: rho 1.0, A  2: max(-2.0, -2.0) = -2.0  (not clipped)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    m = out.metrics
    assert m["policy/clipfrac"].item() == pytest.approx(2 / 3)
    assert m["policy/approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    assert m["policy/ratio"].item() == pytest.approx(1.0)
    assert m["loss/policy"].item() == pytest.approx(out.loss.item())
    assert all(not v.requires_grad for v in m.values())
    out.loss.backward()
    # clipped tokens get no gradient; t2: d(-A rho)/dlogp = -A rho = -2, over 3 tokens; the pad gets 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.0 / 3, 0.0]]))


def test_policy_loss_outside_range_but_unclipped_term_larger():
    # A > 0 with rho < 1 - eps: the pessimistic (max) term is the unclipped one, so the gradient flows.
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), cliprange=0.2)
    assert out.loss.item() == pytest.approx(-0.5)  # max(-0.5, -0.8)
    assert out.metrics["policy/clipfrac"].item() == 0.0
    out.loss.backward()
    assert logp.grad.item() == pytest.approx(-0.5)


def test_policy_loss_does_not_differentiate_old_or_advantages():
    old = torch.zeros(1, 2, requires_grad=True)
    adv = torch.ones(1, 2, requires_grad=True)
    logp = torch.zeros(1, 2, requires_grad=True)
    policy_loss(logp, old, adv, torch.ones(1, 2)).loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None


def test_value_loss_by_hand():
    values = torch.tensor([[3.0, 0.8, 2.0, float("inf")]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    returns = torch.tensor([[4.0, 0.0, 2.5, float("nan")]])
    out = value_loss(values, old, returns, MASK, cliprange_value=0.5)
    # t0: V_clip = 1 + 0.5 = 1.5; max((3-4)^2, (1.5-4)^2) = 6.25 (clipped is larger)
    # t1: V - V_old = -0.2 is inside the range: both errors (0.8-0)^2 = 0.64
    # t2: no change: (2-2.5)^2 = 0.25
    assert out.loss.item() == pytest.approx(0.5 * (6.25 + 0.64 + 0.25) / 3)
    m = out.metrics
    assert m["val/clipfrac"].item() == pytest.approx(1 / 3)
    assert m["val/vpred"].item() == pytest.approx((3.0 + 0.8 + 2.0) / 3)
    assert m["val/error"].item() == pytest.approx((1.0 + 0.64 + 0.25) / 3)
    out.loss.backward()
    # t0: the clipped branch wins and is flat in V -> 0; t1, t2: 0.5 * 2 (V - R) / 3; the pad gets 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.8 / 3, -0.5 / 3, 0.0]]))


def test_value_loss_without_clipping():
    values = torch.tensor([[3.0, 0.8, 2.0, 0.0]])
    out = value_loss(
        values, torch.zeros(1, 4), torch.tensor([[4.0, 0.0, 2.5, 9.0]]), MASK, cliprange_value=None
    )
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 0.64 + 0.25) / 3)
    assert out.metrics["val/clipfrac"].item() == 0.0


def test_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, float("-inf"), float("-inf")]])
    # uniform over 4: log 4; (3/4, 1/4): -(0.75 log 0.75 + 0.25 log 0.25)
    expected = torch.tensor([math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    batch = logits.unsqueeze(0)  # (1, 2, 4)
    assert masked_entropy(batch, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(4))
    assert masked_entropy(batch, torch.tensor([[1, 1]])).item() == pytest.approx(expected.mean().item())
