"""KL estimators and KL controllers, with values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hfrlhf.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate


def test_estimators_by_hand():
    logp = torch.tensor([[-1.0, -0.5, -2.0]])
    ref = torch.tensor([[-2.0, -0.5, -1.0]])
    # log r = ref - logp = [-1, 0, 1]
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[1.0, 0.0, -1.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5, 0.0, 0.5]]))
    k3 = torch.tensor([[math.exp(-1) - 1 + 1, 0.0, math.e - 1 - 1]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), k3)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_estimators_are_unbiased_where_claimed():
    # Two categorical distributions; sample from p and average each estimator.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum().item()
    # Exact expectation under p (no sampling noise): sum_x p(x) k(x)
    logp, logq = p.log(), q.log()
    assert (p * kl_estimate(logp, logq, "k1")).sum().item() == pytest.approx(true_kl, rel=1e-6)
    assert (p * kl_estimate(logp, logq, "k3")).sum().item() == pytest.approx(true_kl, rel=1e-6)
    # k2 is biased (here upwards), but close for nearby distributions
    assert (p * kl_estimate(logp, logq, "k2")).sum().item() != pytest.approx(true_kl, rel=1e-3)


def test_estimator_errors():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes differ"):
        kl_estimate(torch.zeros(2), torch.zeros(3))


def test_fixed_controller():
    ctl = FixedKLController(0.2)
    ctl.update(100.0, n_steps=512)
    assert ctl.value == 0.2
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.2


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(init_beta=0.2, target=4.0, horizon=1000)
    ctl.update(5.0, n_steps=100)  # error 5/4 - 1 = 0.25 -> clipped to 0.2; beta *= 1 + 0.2 * 0.1
    assert ctl.value == pytest.approx(0.2 * 1.02)
    ctl.update(torch.tensor(3.6), n_steps=100)  # error -0.1 -> beta *= 1 - 0.01
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.99)
    ctl.update(0.0, n_steps=50)  # error -1 -> clipped to -0.2; beta *= 1 - 0.2 * 0.05
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.99 * 0.99)
    ctl.update(4.0, n_steps=10_000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.99 * 0.99)


def test_adaptive_controller_state_dict():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=64)
    restored = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
