"""Reward-model losses and ranking metrics: hand-worked values, TRL 1.16's RewardTrainer loss on the same
rewards, and the ranking metrics against brute force."""

from __future__ import annotations

import collections
import itertools
import math
import random
import types

import pytest
import torch
from torch import nn

from hfrlhf.losses import available_losses, get_loss
from hfrlhf.losses.metrics import kendall_tau, ndcg, pairwise_accuracy
from hfrlhf.losses.reward import all_pairs, bradley_terry, mse, plackett_luce

F64 = torch.float64


def nls(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def lse(*xs: float) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def full(p: int, k: int) -> torch.Tensor:
    return torch.ones(p, k, dtype=torch.bool)


CHOSEN = [1.0, 0.0, 2.0]
REJECTED = [0.0, 0.5, 2.0]
MARGIN = [0.5, 0.0, 1.0]


# --- Bradley-Terry ------------------------------------------------------------------------------------------------
def test_bradley_terry_by_hand():
    out = bradley_terry(torch.tensor(CHOSEN, dtype=F64), torch.tensor(REJECTED, dtype=F64))
    assert out.loss.item() == pytest.approx(sum(nls(c - r) for c, r in zip(CHOSEN, REJECTED)) / 3, abs=1e-12)
    m = out.metrics
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"].item() == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    assert (m["min_reward"].item(), m["max_reward"].item()) == (0.0, 2.0)
    assert m["mean_reward"].item() == pytest.approx(5.5 / 6)


def test_bradley_terry_margin_and_centering_by_hand():
    c = 0.01
    want = sum(nls(ch - r - m) for ch, r, m in zip(CHOSEN, REJECTED, MARGIN)) / 3
    want += c * sum((ch + r) ** 2 for ch, r in zip(CHOSEN, REJECTED)) / 3  # (1 + 0.25 + 16) / 3
    out = bradley_terry(torch.tensor(CHOSEN, dtype=F64), torch.tensor(REJECTED, dtype=F64),
                        margin=torch.tensor(MARGIN, dtype=F64), center_rewards_coefficient=c)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert out.metrics["margin"].item() == pytest.approx(0.5 / 3)  # the metric ignores the data's margin


class _Rewards(nn.Module):
    """Stands in for a sequence-classification model: returns fixed rewards, chosen rows first."""

    def __init__(self, rewards: torch.Tensor):
        super().__init__()
        self.rewards = rewards

    def forward(self, **_):
        return types.SimpleNamespace(logits=self.rewards.unsqueeze(-1))


def trl_reward_loss(chosen, rejected, margin=None, center=None):
    """TRL 1.16 ``RewardTrainer.compute_loss`` with a model whose outputs are these rewards."""
    from accelerate import Accelerator
    from trl import RewardTrainer

    trainer = object.__new__(RewardTrainer)
    trainer.model = _Rewards(torch.cat([chosen, rejected]))
    trainer.args = types.SimpleNamespace(center_rewards_coefficient=center)
    trainer.accelerator = Accelerator(cpu=True)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    inputs = {"input_ids": torch.ones(2 * len(chosen), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.1)])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    g = torch.Generator().manual_seed(int(with_margin) + 2 * (center is not None))
    chosen, rejected = 2 * torch.randn(8, generator=g), 2 * torch.randn(8, generator=g)
    margin = torch.rand(8, generator=g) if with_margin else None
    trl_loss, trl_metrics = trl_reward_loss(chosen, rejected, margin, center)
    out = bradley_terry(chosen, rejected, margin=margin, center_rewards_coefficient=center)
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for key in ["accuracy", "margin", "min_reward", "mean_reward", "max_reward"]:
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-6), key


# --- listwise -----------------------------------------------------------------------------------------------------
R = [0.4, -0.3, 1.2]
S = [3.0, 1.0, 2.0]  # slot 0 best, slot 2 second, slot 1 worst


def test_plackett_luce_by_hand():
    want = (lse(R[0], R[2], R[1]) - R[0]) + (lse(R[2], R[1]) - R[2])
    out = plackett_luce(torch.tensor([R], dtype=F64), torch.tensor([S], dtype=F64), full(1, 3))
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert out.metrics["accuracy"].item() == pytest.approx(2 / 3)  # (0,2) wrong, (0,1), (2,1) right
    assert out.metrics["margin"].item() == pytest.approx(((R[0] - R[2]) + (R[0] - R[1]) + (R[2] - R[1])) / 3)


def test_all_pairs_by_hand_with_ragged_prompts():
    rewards = torch.tensor([R, [0.5, 2.0, float("nan")]], dtype=F64, requires_grad=True)
    scores = torch.tensor([S, [1.0, 0.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    first = (nls(R[0] - R[2]) + nls(R[0] - R[1]) + nls(R[2] - R[1])) / 3  # C(3, 2) = 3 pairs
    second = nls(0.5 - 2.0)  # one pair
    out = all_pairs(rewards, scores, mask)
    assert out.loss.item() == pytest.approx((first + second) / 2, abs=1e-12)
    out.loss.backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad[1, 2].item() == 0.0
    assert out.metrics["accuracy"].item() == pytest.approx((2 / 3 + 0.0) / 2)
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_all_pairs_skips_tied_pairs():
    out = all_pairs(torch.tensor([R], dtype=F64), torch.tensor([[2.0, 1.0, 2.0]], dtype=F64), full(1, 3))
    assert out.loss.item() == pytest.approx((nls(R[0] - R[1]) + nls(R[2] - R[1])) / 2, abs=1e-12)


@pytest.mark.parametrize("name", ["plackett_luce", "all_pairs"])
def test_listwise_with_two_responses_is_bradley_terry(name):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    want = bradley_terry(chosen, rejected)
    # rejected in slot 0 for half the prompts
    flip = torch.tensor([True, False] * 3)
    rewards = torch.where(flip.unsqueeze(1), torch.stack([rejected, chosen], 1), torch.stack([chosen, rejected], 1))
    scores = torch.where(flip.unsqueeze(1), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])).to(F64)
    got = get_loss("reward", name).fn(rewards, scores, full(6, 2))
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-12)
    for key in ["accuracy", "margin", "min_reward", "mean_reward", "max_reward"]:
        assert got.metrics[key].item() == pytest.approx(want.metrics[key].item(), abs=1e-12), key


def test_plackett_luce_missing_slots_get_no_gradient():
    rewards = torch.tensor([[0.2, float("nan"), -1.0]], requires_grad=True)
    scores = torch.tensor([[1.0, float("nan"), 0.0]])
    out = plackett_luce(rewards, scores, torch.tensor([[True, False, True]]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(nls(1.2), abs=1e-6)
    assert rewards.grad[0, 1].item() == 0.0 and torch.isfinite(rewards.grad).all()


def test_mse_by_hand():
    out = mse(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]))
    assert out.loss.item() == pytest.approx((1 + 4 + 0) / 3)
    assert out.metrics["mae"].item() == pytest.approx(1.0)


def test_registry():
    assert {"bradley_terry", "plackett_luce", "all_pairs", "mse"} <= set(available_losses("reward"))
    assert get_loss("reward", "plackett_luce").listwise and get_loss("reward", "all_pairs").listwise
    assert not get_loss("reward", "bradley_terry").listwise
    assert get_loss("reward", "mse").needs == ("pointwise",)


# --- ranking metrics ----------------------------------------------------------------------------------------------
def test_kendall_tau_by_hand():
    one = full(1, 3)
    assert kendall_tau(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]]), one).item() == pytest.approx(1 / 3)
    assert kendall_tau(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0]]), one).item() == pytest.approx(-1)
    # a tie in the values: concordant - discordant = 2, untied pairs 2 (values) and 3 (scores)
    assert kendall_tau(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]]), one).item() == pytest.approx(
        2 / math.sqrt(2 * 3))


def test_ndcg_by_hand():
    # gains s - min(s) = (2, 1, 0); the values put slot 2 first, then 1, then 0
    got = ndcg(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]]), full(1, 3))
    assert got.item() == pytest.approx((0 + 1 / math.log2(3) + 2 / 2) / (2 + 1 / math.log2(3)), rel=1e-6)
    top1 = ndcg(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]]), full(1, 3), k=1)
    assert top1.item() == 0.0
    # shifting every score changes nothing (scores = -rank)
    shifted = ndcg(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[-1.0, -2.0, -3.0]]), full(1, 3))
    assert shifted.item() == pytest.approx(got.item())


def brute_tau_b(v, s):
    conc = n_v = n_s = n0 = 0
    for i, j in itertools.combinations(range(len(v)), 2):
        a = (v[i] > v[j]) - (v[i] < v[j])
        b = (s[i] > s[j]) - (s[i] < s[j])
        n0 += 1
        conc += a * b
        n_v += a == 0
        n_s += b == 0
    denom = math.sqrt((n0 - n_v) * (n0 - n_s))
    return None if denom == 0 else conc / denom


def brute_ndcg(v, s, k=None):
    gains = [x - min(s) for x in s]
    k = len(v) if k is None else min(k, len(v))

    def dcg(order):
        return sum(gains[i] / math.log2(pos + 2) for pos, i in enumerate(order[:k]))

    ideal = max(dcg(list(p)) for p in itertools.permutations(range(len(v))))
    if ideal == 0:
        return None
    return dcg(sorted(range(len(v)), key=lambda i: -v[i])) / ideal


@pytest.mark.parametrize("seed", range(5))
def test_ranking_metrics_match_brute_force_on_ragged_batches(seed):
    rng = random.Random(seed)
    p, k = 6, 5
    values, scores, mask = torch.zeros(p, k, dtype=F64), torch.zeros(p, k, dtype=F64), torch.zeros(p, k, dtype=torch.bool)
    taus, gains, gains_at_2 = [], [], []
    for row in range(p):
        n = rng.randint(2, k)
        v = rng.sample(range(20), n)  # distinct values: NDCG then has no tie-breaking to agree on
        s = [rng.randint(0, 3) for _ in range(n)]  # ties in the labels
        values[row, :n], scores[row, :n], mask[row, :n] = torch.tensor(v, dtype=F64), torch.tensor(s, dtype=F64), True
        values[row, n:], scores[row, n:] = float("nan"), float("nan")
        for out, x in ((taus, brute_tau_b(v, s)), (gains, brute_ndcg(v, s)), (gains_at_2, brute_ndcg(v, s, 2))):
            if x is not None:
                out.append(x)
    assert kendall_tau(values, scores, mask).item() == pytest.approx(sum(taus) / len(taus), abs=1e-12)
    assert ndcg(values, scores, mask).item() == pytest.approx(sum(gains) / len(gains), abs=1e-12)
    assert ndcg(values, scores, mask, k=2).item() == pytest.approx(sum(gains_at_2) / len(gains_at_2), abs=1e-12)


def test_pairwise_accuracy_by_hand():
    got = pairwise_accuracy(torch.tensor([[1.0, 2.0, 0.0], [5.0, 1.0, 9.0]]), torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]),
                            torch.tensor([[True, True, True], [True, True, False]]))
    assert got.item() == pytest.approx((2 / 3 + 1.0) / 2)
