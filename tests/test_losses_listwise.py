"""Listwise policy losses (PRO, LiPO-lambda, RRHF): hand-worked values, the K=2 equalities with their
pairwise counterparts, and that missing slots change nothing, gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from hfrlhf.losses import get_loss
from hfrlhf.losses.listwise import ListLogps, best_response_nll, lipo_lambda_weights, plackett_luce_nll
from hfrlhf.losses.preference import PairLogps, chosen_nll

F64 = torch.float64


def lse(*xs: float) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def softplus_neg(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def fn(name):
    return get_loss("preference", name).fn


def full(p: int, k: int) -> torch.Tensor:
    return torch.ones(p, k, dtype=torch.bool)


# one prompt, three responses; slot 0 best, slot 2 second, slot 1 worst
LOGPS = torch.tensor([[-4.0, -6.0, -9.0]], dtype=F64)
REF = torch.tensor([[-5.0, -5.0, -5.0]], dtype=F64)
LENS = torch.tensor([[2, 3, 4]])
SCORES = torch.tensor([[3.0, 1.0, 2.0]], dtype=F64)
BETA = 0.5
V = [0.5, -0.5, -2.0]  # beta * (logps - ref)


def test_pro_by_hand():
    # order 0 > 2 > 1: -log softmax over {0, 2, 1} at 0, then over {2, 1} at 2
    want = (lse(V[0], V[2], V[1]) - V[0]) + (lse(V[2], V[1]) - V[2])
    out = fn("pro")(ListLogps(LOGPS, LENS), ListLogps(REF, LENS), SCORES, full(1, 3), beta=BETA)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(V[0])
    assert m["rewards/rejected"].item() == pytest.approx(V[1])
    assert m["rewards/margins"].item() == pytest.approx(V[0] - V[1])
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)  # (0,2) and (0,1) right, (2,1) wrong
    assert m["logps/chosen"].item() == -4.0 and m["logps/rejected"].item() == -6.0


def test_lipo_lambda_by_hand():
    # ranks by reward: slot 0 -> 1, slot 1 -> 2, slot 2 -> 3; gains 2^s = 8, 2, 4; 1/log2(1+tau) = 1, 1/log2 3, 1/2
    inv = [1.0, 1 / math.log2(3), 0.5]
    gain = [8.0, 2.0, 4.0]
    pairs = [(0, 2), (0, 1), (2, 1)]  # (better, worse) by score
    weights = {(i, j): abs(gain[i] - gain[j]) * abs(inv[i] - inv[j]) for i, j in pairs}
    assert weights[(0, 2)] == pytest.approx(2.0)
    want = sum(w * softplus_neg(V[i] - V[j]) for (i, j), w in weights.items())
    out = fn("lipo")(ListLogps(LOGPS, LENS), ListLogps(REF, LENS), SCORES, full(1, 3), beta=BETA)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    w = lipo_lambda_weights(torch.tensor([V], dtype=F64), SCORES, full(1, 3))[0]
    for (i, j), value in weights.items():
        assert w[i, j].item() == pytest.approx(value)
        assert w[j, i].item() == 0.0


def test_lipo_ranks_follow_the_current_rewards():
    # same scores, rewards reordered: slot 2 now ranked first, so the (0, 2) pair's discount gap changes
    swapped = lipo_lambda_weights(torch.tensor([[0.0, -1.0, 1.0]]), SCORES.float(), full(1, 3))[0]
    # tau: slot 2 -> 1, slot 0 -> 2, slot 1 -> 3
    assert swapped[0, 2].item() == pytest.approx((8 - 4) * (1 - 1 / math.log2(3)), rel=1e-6)
    assert swapped[0, 1].item() == pytest.approx((8 - 2) * (1 / math.log2(3) - 0.5), rel=1e-6)


def test_rrhf_by_hand():
    a = [-4 / 2, -6 / 3, -9 / 4]
    hinge = max(0.0, a[2] - a[0]) + max(0.0, a[1] - a[0]) + max(0.0, a[1] - a[2])  # only the last is active
    assert hinge == pytest.approx(0.25)
    want = hinge - a[0]
    out = fn("rrhf")(ListLogps(LOGPS, LENS), None, SCORES, full(1, 3))
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(a[0])


def test_plackett_luce_ties_share_the_competitor_set():
    v = [0.3, -0.2, 1.1]
    got = plackett_luce_nll(torch.tensor([v], dtype=F64), torch.tensor([[2.0, 2.0, 1.0]], dtype=F64), full(1, 3))
    want = (lse(*v) - v[0]) + (lse(*v) - v[1])  # slot 2 has nothing below it: no term
    assert got.item() == pytest.approx(want, abs=1e-12)
    all_tied = plackett_luce_nll(torch.tensor([v]), torch.tensor([[1.0, 1.0, 1.0]]), full(1, 3))
    assert all_tied.item() == 0.0


# --- K = 2 equals the pairwise loss -----------------------------------------------------------------------------
def random_pairs(seed: int, b: int = 5):
    g = torch.Generator().manual_seed(seed)
    c_len, r_len = torch.randint(1, 9, (b,), generator=g), torch.randint(1, 9, (b,), generator=g)
    pol = PairLogps(-2 * c_len * torch.rand(b, generator=g, dtype=F64), -2 * r_len * torch.rand(b, generator=g, dtype=F64),
                    c_len, r_len)
    ref = PairLogps(pol.chosen + torch.randn(b, generator=g, dtype=F64), pol.rejected + torch.randn(b, generator=g, dtype=F64),
                    c_len, r_len)
    return pol, ref


def as_list(pair: PairLogps, flip: bool) -> ListLogps:
    """K = 2 lists; with ``flip`` the rejected response sits in slot 0."""
    cols = [pair.rejected, pair.chosen] if flip else [pair.chosen, pair.rejected]
    lens = [pair.rejected_len, pair.chosen_len] if flip else [pair.chosen_len, pair.rejected_len]
    return ListLogps(torch.stack(cols, dim=1), torch.stack(lens, dim=1))


def k2_scores(b: int, flip: bool, best: float = 1.0, worst: float = 0.0) -> torch.Tensor:
    row = [worst, best] if flip else [best, worst]
    return torch.tensor([row] * b, dtype=F64)


METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]


@pytest.mark.parametrize("flip", [False, True])
def test_pro_with_two_responses_is_dpo_sigmoid(flip):
    pol, ref = random_pairs(seed=1)
    want = fn("sigmoid")(pol, ref, beta=0.3)
    got = fn("pro")(as_list(pol, flip), as_list(ref, flip), k2_scores(5, flip), full(5, 2), beta=0.3)
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-12)
    for key in METRICS:
        assert got.metrics[key].item() == pytest.approx(want.metrics[key].item(), abs=1e-12), key


@pytest.mark.parametrize(("flip", "best", "worst"), [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 2.5, 0.5)])
def test_lipo_with_two_responses_is_a_constant_times_dpo_sigmoid(flip, best, worst):
    pol, ref = random_pairs(seed=2)
    constant = (2**best - 2**worst) * (1 - 1 / math.log2(3))  # 1 - 1/log2(3) = 0.3690702...
    want = fn("sigmoid")(pol, ref, beta=0.3)
    got = fn("lipo")(as_list(pol, flip), as_list(ref, flip), k2_scores(5, flip, best, worst), full(5, 2), beta=0.3)
    assert got.loss.item() == pytest.approx(constant * want.loss.item(), abs=1e-12)
    for key in METRICS:
        assert got.metrics[key].item() == pytest.approx(want.metrics[key].item(), abs=1e-12), key


@pytest.mark.parametrize("flip", [False, True])
def test_rrhf_with_two_responses_is_its_pairwise_hinge(flip):
    pol, _ = random_pairs(seed=3)
    a_w = (pol.chosen / pol.chosen_len).tolist()
    a_l = (pol.rejected / pol.rejected_len).tolist()
    want = sum(max(0.0, lo - w) - w for w, lo in zip(a_w, a_l)) / len(a_w)
    got = fn("rrhf")(as_list(pol, flip), None, k2_scores(5, flip), full(5, 2))
    assert got.loss.item() == pytest.approx(want, abs=1e-12)
    assert got.metrics["rewards/accuracies"].item() == pytest.approx(
        sum(w > lo for w, lo in zip(a_w, a_l)) / len(a_w))


def test_best_response_nll_with_two_responses_is_chosen_nll():
    pol, _ = random_pairs(seed=4)
    assert best_response_nll(as_list(pol, True), k2_scores(5, True), full(5, 2)).item() == pytest.approx(
        chosen_nll(pol).item(), abs=1e-12)


# --- missing slots ----------------------------------------------------------------------------------------------
def ragged_batch():
    """Prompt 0 has three responses; prompt 1 has two, its third slot holds nan everywhere."""
    nan = float("nan")
    logps = torch.tensor([[-4.0, -6.0, -9.0], [-3.0, -8.0, nan]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-5.0, -5.0, -5.0], [-4.0, -6.0, nan]], dtype=F64, requires_grad=True)
    lens = torch.tensor([[2, 3, 4], [5, 2, 0]])
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, nan]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logps, ref, lens, scores, mask


@pytest.mark.parametrize("name", ["pro", "lipo", "rrhf"])
def test_missing_slots_change_nothing_and_get_no_gradient(name):
    logps, ref, lens, scores, mask = ragged_batch()
    out = fn(name)(ListLogps(logps, lens), ListLogps(ref, lens), scores, mask, beta=BETA)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[1, 2].item() == 0.0
    if not get_loss("preference", name).reference_free:
        assert torch.isfinite(ref.grad).all() and ref.grad[1, 2].item() == 0.0

    # the same two prompts scored on their own: the loss is their mean, and the gradients agree
    separate, grads = [], []
    for p, k in [(0, 3), (1, 2)]:
        lp = logps[p : p + 1, :k].detach().clone().requires_grad_(True)
        rf = ref[p : p + 1, :k].detach().clone()
        one = fn(name)(ListLogps(lp, lens[p : p + 1, :k]), ListLogps(rf, lens[p : p + 1, :k]), scores[p : p + 1, :k],
                       full(1, k), beta=BETA)
        one.loss.backward()
        separate.append(one.loss.item())
        grads.append(lp.grad[0])
    assert out.loss.item() == pytest.approx(sum(separate) / 2, abs=1e-12)
    assert logps.grad[0].tolist() == pytest.approx((grads[0] / 2).tolist(), abs=1e-12)
    assert logps.grad[1, :2].tolist() == pytest.approx((grads[1] / 2).tolist(), abs=1e-12)


def test_no_reference_means_uniform_reference():
    pol = ListLogps(LOGPS, LENS)
    zeros = ListLogps(torch.zeros_like(LOGPS), LENS)
    for name in ["pro", "lipo"]:
        assert fn(name)(pol, None, SCORES, full(1, 3)).loss.item() == pytest.approx(
            fn(name)(pol, zeros, SCORES, full(1, 3)).loss.item())


def test_registry_flags():
    for name in ["pro", "lipo", "rrhf"]:
        assert get_loss("preference", name).listwise
    assert get_loss("preference", "rrhf").reference_free
    assert not get_loss("preference", "pro").reference_free and not get_loss("preference", "lipo").reference_free


@pytest.mark.parametrize("family,name", [("preference", "pro"), ("preference", "lipo"), ("preference", "rrhf"),
                                         ("reward", "plackett_luce"), ("reward", "all_pairs")])
def test_a_batch_of_tied_scores_only_is_a_zero_loss_that_backpropagates(family, name):
    """Every prompt's scores tie: no pair, nothing to learn. The loss is 0 and backward gives zero gradients (it
    used to be a constant without a graph, and training stopped in backward)."""
    scores = torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    values = torch.tensor([[-4.0, -6.0, -9.0], [-1.0, -2.0, 0.0]], dtype=F64, requires_grad=True)
    spec = get_loss(family, name)
    if family == "reward":
        out = spec.fn(values, scores, mask)
    else:
        lens = torch.tensor([[2, 3, 4], [1, 1, 1]])
        out = spec.fn(ListLogps(values, lens), ListLogps(values.detach() - 1.0, lens), scores, mask, beta=BETA)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert values.grad is not None and values.grad.abs().sum().item() == 0.0
