"""Masked reductions and running moments, against hand-computed values and plain torch on the kept entries."""

from __future__ import annotations

import pytest
import torch

from hfrlhf.ops.masked import RunningMoments, masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, -50.0, 7.0]])
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # kept: 1, 2, 3, 4, 6 -> mean 3.2


def test_sum_and_mean():
    assert masked_sum(X, M).item() == pytest.approx(16.0)
    assert masked_mean(X, M).item() == pytest.approx(3.2)
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(masked_sum(X, M, dim=0), torch.tensor([5.0, 8.0, 3.0, 0.0]))
    # bool and float masks behave the same
    assert masked_mean(X, M.bool()).item() == masked_mean(X, M.float()).item()


def test_pads_holding_inf_or_nan_do_not_leak():
    x = X.clone()
    x[0, 3], x[1, 2] = float("inf"), float("nan")
    assert masked_mean(x, M).item() == pytest.approx(3.2)
    assert torch.isfinite(masked_whiten(x, M)).all()


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros_like(M)
    assert masked_mean(X, empty).item() == 0.0
    torch.testing.assert_close(
        masked_mean(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), dim=1), torch.tensor([1.0, 0.0])
    )
    assert masked_var(X, empty).item() == 0.0
    assert masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), unbiased=True).item() == 0.0


def test_var_by_hand():
    # deviations from 3.2: -2.2, -1.2, -0.2, 0.8, 2.8; squares sum to 4.84 + 1.44 + 0.04 + 0.64 + 7.84 = 14.8
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14.8 / 5)
    assert masked_var(X, M, unbiased=True).item() == pytest.approx(14.8 / 4)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    assert masked_var(X, M).item() == pytest.approx(kept.var(unbiased=True).item())


def test_whiten():
    w = masked_whiten(X, M)
    std = (14.8 / 5) ** 0.5  # biased, as lm-human-preference-details
    expected = torch.tensor([[1 - 3.2, 2 - 3.2, 3 - 3.2, 0.0], [4 - 3.2, 6 - 3.2, 0.0, 0.0]]) / std
    torch.testing.assert_close(w, expected)
    assert masked_mean(w, M).abs().item() < 1e-6
    assert masked_var(w, M, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    w2 = masked_whiten(X, M, shift_mean=False)
    torch.testing.assert_close(w2, torch.where(M.bool(), expected + 3.2, torch.zeros_like(expected)))


def test_whiten_all_reduce_uses_global_batch():
    # Two "processes" each holding half of the data; summing their stats gives the global whitening.
    a, ma = X[:1], M[:1]
    b, mb = X[1:], M[1:]

    def all_reduce_for(other_x: torch.Tensor, other_m: torch.Tensor):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            # emulate a sum over processes: the stat of this shard plus the same stat of the other shard
            if t.dim() == 1:  # (sum, count)
                return t + torch.stack([masked_sum(other_x, other_m), other_m.sum().to(t.dtype)])
            mean = (masked_sum(X, M) / M.sum()).to(t.dtype)
            return t + masked_sum((other_x - mean) ** 2, other_m)

        return all_reduce

    wa = masked_whiten(a, ma, all_reduce=all_reduce_for(b, mb))
    wb = masked_whiten(b, mb, all_reduce=all_reduce_for(a, ma))
    torch.testing.assert_close(torch.cat([wa, wb]), masked_whiten(X, M))


def test_mask_shape_checked():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(X, M[:, :3])


def test_running_moments_matches_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 5 for n in (7, 1, 30, 2)]
    rm = RunningMoments()
    for b in batches:
        batch_mean, batch_std = rm.update(b)
        assert batch_mean == pytest.approx(b.mean().item(), rel=1e-6)
        assert batch_std == pytest.approx(b.std().item() if b.numel() > 1 else 0.0, rel=1e-6)
    everything = torch.cat(batches).double()
    assert rm.count == everything.numel()
    assert rm.mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert rm.var == pytest.approx(everything.var(unbiased=False).item(), rel=1e-12)
    assert rm.std == pytest.approx(everything.std(unbiased=True).item(), rel=1e-12)


def test_running_moments_by_hand_with_mask():
    rm = RunningMoments()
    assert rm.std == 1.0 and rm.count == 0
    rm.update(torch.tensor([[2.0, 4.0, 99.0]]), mask=torch.tensor([[1, 1, 0]]))
    assert (rm.mean, rm.var, rm.count) == (3.0, 1.0, 2)
    rm.update(torch.tensor([6.0]))
    # values 2, 4, 6: mean 4, population variance 8/3
    assert rm.mean == pytest.approx(4.0) and rm.var == pytest.approx(8 / 3) and rm.count == 3
    assert rm.update(torch.zeros(0)) == (0.0, 0.0)  # empty batch: state unchanged
    assert rm.count == 3


def test_running_moments_state_dict_roundtrip():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 5.0, 9.0]))
    state = rm.state_dict()
    restored = RunningMoments()
    restored.load_state_dict(state)
    for r in (rm, restored):
        r.update(torch.tensor([2.0, 3.0]))
    assert restored.state_dict() == rm.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())


def test_running_moments_all_reduce():
    shard_a, shard_b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 10.0])
    everything = torch.cat([shard_a, shard_b]).double()
    mean = everything.mean()

    def all_reduce(t: torch.Tensor) -> torch.Tensor:  # as seen from shard a
        if t.dim() == 1:
            return t + torch.tensor([shard_b.sum().item(), 2.0], dtype=t.dtype)
        return t + ((shard_b.double() - mean) ** 2).sum()

    rm = RunningMoments(all_reduce=all_reduce)
    batch_mean, batch_std = rm.update(shard_a)
    assert batch_mean == pytest.approx(mean.item())
    assert batch_std == pytest.approx(everything.std().item())
    assert rm.count == 4
