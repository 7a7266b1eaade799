"""Pairwise DPO-family losses: values worked out by hand with ``math``, and TRL 1.16 on the same tensors.

TRL's DPO loss lives inside ``DPOTrainer._compute_loss``; the parity tests run that method on an instance
made with ``object.__new__`` and the attributes the method reads, with a stand-in model whose per-token
log-probs sum to the chosen values and reference log-probs passed as precomputed. SimPO and ORPO run
TRL's experimental CPO and ORPO trainers' ``get_batch_loss_metrics`` on a stand-in model that returns
fixed logits; our inputs are the log-probs of the same logits, computed here independently.
"""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
from torch import nn

from hfrlhf.losses import get_loss
from hfrlhf.losses.preference import PairLogps, chosen_nll


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def pairs(chosen, rejected, chosen_len, rejected_len, dtype=torch.float64) -> PairLogps:
    return PairLogps(torch.tensor(chosen, dtype=dtype), torch.tensor(rejected, dtype=dtype),
                     torch.tensor(chosen_len), torch.tensor(rejected_len))


# two pairs; log-ratios h_w = (1, -1), h_l = (0, -1); lengths (2, 3) and (1, 4)
POL = pairs([-4.0, -6.0], [-5.0, -7.0], [2, 3], [1, 4])
REF = pairs([-5.0, -5.0], [-5.0, -6.0], [2, 3], [1, 4])
H_W, H_L = [1.0, -1.0], [0.0, -1.0]


def loss_fn(name):
    return get_loss("preference", name).fn


def mean(xs):
    return sum(xs) / len(xs)


# --- hand-worked values ---------------------------------------------------------------------------------------
def test_sigmoid_by_hand():
    beta = 0.5
    want = mean([-logsig(beta * (w - lo)) for w, lo in zip(H_W, H_L)])
    out = loss_fn("sigmoid")(POL, REF, beta=beta)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(beta * mean(H_W))
    assert m["rewards/rejected"].item() == pytest.approx(beta * mean(H_L))
    assert m["rewards/margins"].item() == pytest.approx(beta * mean([w - lo for w, lo in zip(H_W, H_L)]))
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)  # second pair is a tie: counts as wrong
    assert m["logps/chosen"].item() == pytest.approx(-5.0)
    assert m["logps/rejected"].item() == pytest.approx(-6.0)
    assert all(not v.requires_grad for v in m.values())


def test_sigmoid_label_smoothing_is_cdpo_by_hand():
    beta, eps = 0.5, 0.2
    want = mean([-(1 - eps) * logsig(beta * (w - lo)) - eps * logsig(-beta * (w - lo)) for w, lo in zip(H_W, H_L)])
    assert loss_fn("sigmoid")(POL, REF, beta=beta, label_smoothing=eps).loss.item() == pytest.approx(want, abs=1e-12)


def test_hinge_by_hand():
    beta = 2.0
    want = mean([max(0.0, 1 - beta * (w - lo)) for w, lo in zip(H_W, H_L)])  # (max(0, -1) + 1) / 2
    assert loss_fn("hinge")(POL, REF, beta=beta).loss.item() == pytest.approx(want) == 0.5


def test_ipo_averages_log_ratios_over_tokens_by_hand():
    beta = 0.5
    # pair 0: 1/2 - 0/1 = 0.5; pair 1: -1/3 - (-1/4) = -1/12; target 1/(2 beta) = 1
    want = mean([(0.5 - 1.0) ** 2, (-1 / 12 - 1.0) ** 2])
    out = loss_fn("ipo")(POL, REF, beta=beta)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * mean(H_W))  # summed log-ratios


def test_robust_by_hand():
    beta, eps = 0.5, 0.1
    want = mean([((1 - eps) * -logsig(beta * (w - lo)) - eps * -logsig(-beta * (w - lo))) / (1 - 2 * eps)
                 for w, lo in zip(H_W, H_L)])
    assert loss_fn("robust")(POL, REF, beta=beta, label_smoothing=eps).loss.item() == pytest.approx(want, abs=1e-12)
    # eps = 0 is DPO
    assert loss_fn("robust")(POL, REF, beta=beta).loss.item() == pytest.approx(
        loss_fn("sigmoid")(POL, REF, beta=beta).loss.item())
    with pytest.raises(ValueError, match="label_smoothing"):
        loss_fn("robust")(POL, REF, label_smoothing=0.5)


def test_rdpo_by_hand():
    beta, alpha = 0.5, 0.25
    gaps = [2 - 1, 3 - 4]  # |y_w| - |y_l|
    want = mean([-logsig(beta * (w - lo) + alpha * g) for w, lo, g in zip(H_W, H_L, gaps)])
    out = loss_fn("rdpo")(POL, REF, beta=beta, rdpo_alpha=alpha)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert loss_fn("rdpo")(POL, REF, beta=beta).loss.item() == pytest.approx(
        loss_fn("sigmoid")(POL, REF, beta=beta).loss.item())
    # a pair whose chosen answer is longer gets a smaller gradient than under DPO
    pol = pairs([-4.0], [-4.0], [8], [2])
    pol.chosen.requires_grad_(True)
    (g_rdpo,) = torch.autograd.grad(loss_fn("rdpo")(pol, None, beta=beta, rdpo_alpha=alpha).loss, pol.chosen)
    (g_dpo,) = torch.autograd.grad(loss_fn("sigmoid")(pol, None, beta=beta).loss, pol.chosen)
    assert 0 > g_rdpo.item() > g_dpo.item()


def test_simpo_by_hand():
    beta, gamma, eps = 2.0, 0.5, 0.1
    a_w, a_l = [-4 / 2, -6 / 3], [-5 / 1, -7 / 4]
    z = [beta * (w - lo) - gamma for w, lo in zip(a_w, a_l)]
    pref = mean([-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z])
    out = loss_fn("simpo")(POL, None, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(pref, abs=1e-12)
    assert "nll_loss" not in out.metrics
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * mean(a_w))
    assert out.metrics["rewards/rejected"].item() == pytest.approx(beta * mean(a_l))
    # CPO-SimPO: NLL over all chosen tokens, (4 + 6) / (2 + 3)
    out = loss_fn("simpo")(POL, None, beta=beta, simpo_gamma=gamma, label_smoothing=eps, cpo_alpha=0.5)
    assert out.loss.item() == pytest.approx(pref + 0.5 * 10 / 5, abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(2.0)


def test_orpo_by_hand():
    lam = 0.1
    a_w, a_l = [-4 / 2, -6 / 3], [-5 / 1, -7 / 4]

    def log_odds(a):
        return a - math.log(1 - math.exp(a))

    lo = [log_odds(w) - log_odds(r) for w, r in zip(a_w, a_l)]
    nll = 10 / 5
    want = nll - lam * mean([logsig(x) for x in lo])
    out = loss_fn("orpo")(POL, None, beta=lam)
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert out.metrics["nll_loss"].item() == pytest.approx(nll, abs=1e-6)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(mean(lo), abs=1e-6)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(mean([logsig(x) for x in lo]), abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(lam * mean(a_w), abs=1e-6)


def test_orpo_finite_at_extreme_probabilities():
    pol = pairs([-1e-6, -200.0], [-80.0, -1e-7], [1, 2], [2, 1], dtype=torch.float32)
    pol.chosen.requires_grad_(True)
    pol.rejected.requires_grad_(True)
    out = loss_fn("orpo")(pol, None, beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(pol.chosen.grad).all() and torch.isfinite(pol.rejected.grad).all()


def test_chosen_nll_by_hand():
    assert chosen_nll(POL).item() == pytest.approx(mean([4 / 2, 6 / 3]))
    assert chosen_nll(POL, token_level=True).item() == pytest.approx((4 + 6) / (2 + 3))
    empty = pairs([0.0], [-1.0], [0], [1])
    assert chosen_nll(empty).item() == 0.0  # an empty completion gives 0, not nan


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sigmoid_norm_by_hand():
    beta, eps = 0.5, 0.1
    # per-token log-ratio margins: 1/2 - 0/1 and -1/3 - (-1/4)
    z = [beta * 0.5, beta * (-1 / 3 + 1 / 4)]
    out = loss_fn("sigmoid_norm")(POL, REF, beta=beta)
    assert out.loss.item() == pytest.approx(mean([-logsig(x) for x in z]), abs=1e-12)
    out = loss_fn("sigmoid_norm")(POL, REF, beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(mean([-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z]), abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * mean(H_W))  # summed, as TRL logs them


def test_exo_pair_is_kl_to_smoothed_label_by_hand():
    beta, eps = 0.5, 0.1
    want = []
    for w, lo in zip(H_W, H_L):
        q = sig(beta * (w - lo))
        want.append(q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps))
    out = loss_fn("exo_pair")(POL, REF, beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(mean(want), abs=1e-12)
    # KL is zero exactly when the model's preference equals the target: beta * Delta = log((1 - eps) / eps)
    target = math.log((1 - eps) / eps)
    at_target = loss_fn("exo_pair")(pairs([target], [0.0], [1], [1]), None, beta=1.0, label_smoothing=eps)
    assert at_target.loss.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        loss_fn("exo_pair")(POL, REF, label_smoothing=0.0)


def test_exo_pair_pushes_back_past_the_target():
    """Mode-seeking: beyond q_w = 1 - eps the loss rises again, so the chosen log-prob gets a positive gradient."""
    eps = 0.1
    far = pairs([10.0], [0.0], [1], [1])
    far.chosen.requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn("exo_pair")(far, None, beta=1.0, label_smoothing=eps).loss, far.chosen)
    assert g.item() > 0
    (g_dpo,) = torch.autograd.grad(loss_fn("sigmoid")(far, None, beta=1.0).loss, far.chosen)
    assert g_dpo.item() < 0


def test_nca_and_bco_pair_by_hand():
    beta = 0.5
    r_w, r_l = [beta * w for w in H_W], [beta * lo for lo in H_L]
    nca = mean([-logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b) for a, b in zip(r_w, r_l)])
    bco = mean([-logsig(a) - logsig(-b) for a, b in zip(r_w, r_l)])
    assert loss_fn("nca_pair")(POL, REF, beta=beta).loss.item() == pytest.approx(nca, abs=1e-12)
    assert loss_fn("bco_pair")(POL, REF, beta=beta).loss.item() == pytest.approx(bco, abs=1e-12)


def test_sppo_hard_by_hand():
    # beta = 0.5: targets +-1/(2 beta) = +-1; pair 0: (1-1)^2 + (0+1)^2 = 1, pair 1: (-1-1)^2 + (-1+1)^2 = 4
    assert loss_fn("sppo_hard")(POL, REF, beta=0.5).loss.item() == pytest.approx(2.5, abs=1e-12)


def test_apo_zero_and_down_by_hand():
    beta = 0.5
    zero = mean([(1 - sig(beta * w)) + sig(beta * lo) for w, lo in zip(H_W, H_L)])
    down = mean([sig(beta * w) + (1 - sig(beta * (w - lo))) for w, lo in zip(H_W, H_L)])
    assert loss_fn("apo_zero")(POL, REF, beta=beta).loss.item() == pytest.approx(zero, abs=1e-12)
    assert loss_fn("apo_down")(POL, REF, beta=beta).loss.item() == pytest.approx(down, abs=1e-12)
    # the anchors: once the margin is there, apo_zero still raises the chosen log-prob, apo_down lowers it
    # (d/dh_w: -b s'(b h_w) against b s'(b h_w) - b s'(b Delta), with s'(-1.5) = 0.149 > s'(3) = 0.045)
    pol = pairs([-3.0], [-9.0], [1], [1])
    pol.chosen.requires_grad_(True)
    (g_zero,) = torch.autograd.grad(loss_fn("apo_zero")(pol, None, beta=beta).loss, pol.chosen)
    (g_down,) = torch.autograd.grad(loss_fn("apo_down")(pol, None, beta=beta).loss, pol.chosen)
    assert g_zero.item() < 0 < g_down.item()


def test_discopop_by_hand_and_finite_for_large_negative_margins():
    beta, tau = 0.5, 0.05
    want = []
    for w, lo in zip(H_W, H_L):
        z = beta * (w - lo)
        m = sig(z / tau)
        want.append(-logsig(z) * (1 - m) + math.exp(-z) * m)
    out = loss_fn("discopop")(POL, REF, beta=beta, discopop_tau=tau)
    assert out.loss.item() == pytest.approx(mean(want), abs=1e-12)
    # float32, margin -100: exp(100) alone overflows float32; the blended term is exp(-1900), i.e. 0
    pol = pairs([-100.0], [0.0], [1], [1], dtype=torch.float32)
    pol.chosen.requires_grad_(True)
    out = loss_fn("discopop")(pol, None, beta=1.0, discopop_tau=tau)
    (g,) = torch.autograd.grad(out.loss, pol.chosen)
    assert out.loss.item() == pytest.approx(100.0, rel=1e-6)  # -log sigmoid(-100) = 100 + log(1 + e^-100)
    assert torch.isfinite(g).all() and g.item() == pytest.approx(-1.0, rel=1e-6)


def test_aot_sorts_margins_across_the_batch_by_hand():
    beta, eps = 0.5, 0.1
    # policy margins u = (2, -1, 0), reference margins v = (0, 1, -3): sorted, d = (-1, 0, 2) - (-3, 0, 1)
    pol = pairs([0.0, -1.0, -4.0], [-2.0, 0.0, -4.0], [1, 1, 1], [1, 1, 1])
    ref = pairs([0.0, -1.0, -5.0], [0.0, -2.0, -2.0], [1, 1, 1], [1, 1, 1])
    d = [2.0, 0.0, 1.0]
    want = mean([-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in d])
    out = loss_fn("aot")(pol, ref, beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    # matched pair by pair instead (2, -2, 3), the loss would differ: sorting is the point
    unsorted = mean([-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in (2.0, -2.0, 3.0)])
    assert abs(out.loss.item() - unsorted) > 1e-2


def test_aot_unpaired_by_hand():
    beta = 0.5
    # sort(h_w) = (-1, 1), sort(h_l) = (-1, 0): d = (0, 1)
    want = mean([-logsig(0.0), -logsig(beta * 1.0)])
    assert loss_fn("aot_unpaired")(POL, REF, beta=beta).loss.item() == pytest.approx(want, abs=1e-12)


def test_sft_loss_is_token_level_chosen_nll():
    out = loss_fn("sft")(POL, REF, beta=0.5)
    assert out.loss.item() == pytest.approx((4 + 6) / (2 + 3))
    assert out.metrics["nll_loss"].item() == pytest.approx(2.0)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5 * mean(H_W))
    assert get_loss("preference", "sft").reference_free


def test_no_reference_means_uniform_reference():
    zeros = PairLogps(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), POL.chosen_len,
                      POL.rejected_len)
    for name in ["sigmoid", "hinge", "ipo", "robust", "rdpo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
                 "sppo_hard", "apo_zero", "apo_down", "discopop", "aot", "aot_unpaired"]:
        a = loss_fn(name)(POL, None, beta=0.3, label_smoothing=0.1, rdpo_alpha=0.1)
        b = loss_fn(name)(POL, zeros, beta=0.3, label_smoothing=0.1, rdpo_alpha=0.1)
        assert a.loss.item() == pytest.approx(b.loss.item()), name


def test_registry_flags_and_unknown_keywords():
    for name in ["sigmoid", "hinge", "ipo", "robust", "rdpo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
                 "sppo_hard", "apo_zero", "apo_down", "discopop", "aot", "aot_unpaired"]:
        spec = get_loss("preference", name)
        assert not spec.reference_free and not spec.listwise
    for name in ["simpo", "orpo", "sft"]:
        assert get_loss("preference", name).reference_free
    # a trainer hands every loss the same keywords; unrelated ones are ignored
    loss_fn("sigmoid")(POL, REF, beta=0.1, simpo_gamma=1.0, margin=None, cpo_alpha=3.0)


def test_gradient_reaches_policy_only():
    pol = pairs([-4.0, -6.0], [-5.0, -7.0], [2, 3], [1, 4])
    ref = pairs([-5.0, -5.0], [-5.0, -6.0], [2, 3], [1, 4])
    for t in (*pol[:2], *ref[:2]):
        t.requires_grad_(True)
    out = loss_fn("sigmoid")(pol, ref, beta=0.5)
    out.loss.backward()
    # d/d logpi_w of mean_i -log sigmoid(beta Delta_i) = -beta sigmoid(-beta Delta_i) / B
    want = [-0.5 * (1 - 1 / (1 + math.exp(-x))) / 2 for x in (0.5 * 1.0, 0.5 * 0.0)]
    assert pol.chosen.grad.tolist() == pytest.approx(want)
    assert pol.rejected.grad.tolist() == pytest.approx([-g for g in want])


# --- TRL 1.16 on the same tensors ----------------------------------------------------------------------------
class _PerTokenLogps(nn.Module):
    """Stands in for a causal LM with TRL's fused head: returns fixed per-token log-probs."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=None, use_cache=None, **_):
        zero = torch.zeros_like(self.per_token)
        return types.SimpleNamespace(log_probs=self.per_token, entropy=zero, mean_logits=zero, is_top1=zero.bool())


def _metric_store():
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


def trl_dpo(loss_type: str, pol: PairLogps, ref: PairLogps, beta: float, label_smoothing: float = 0.0,
            discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """TRL 1.16 ``DPOTrainer._compute_loss`` on sequences whose completions have exactly these log-probs."""
    from accelerate import Accelerator
    from trl import DPOTrainer

    logps = torch.cat([pol.chosen, pol.rejected]).detach()
    lens = torch.cat([pol.chosen_len, pol.rejected_len])
    n, t = len(lens), int(lens.max()) + 1  # one prompt token, then the completion
    per_token = torch.zeros(n, t - 1, dtype=logps.dtype)
    completion_mask = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        per_token[i, : lens[i]] = logps[i] / lens[i]  # spread the sum over the completion tokens
        completion_mask[i, 1 : 1 + lens[i]] = 1
    trainer = object.__new__(DPOTrainer)
    trainer.model = _PerTokenLogps(per_token)
    trainer.accelerator = Accelerator(cpu=True)
    trainer.aux_loss_enabled, trainer.ld_alpha, trainer.precompute_ref_logps = False, None, True
    trainer.f_divergence_type, trainer.use_weighting = f_divergence_type, False
    trainer.f_alpha_divergence_coef = f_alpha_divergence_coef
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.args = types.SimpleNamespace(discopop_tau=discopop_tau)
    trainer._metrics, trainer._total_train_tokens, trainer._tp_size = _metric_store(), 0, 1
    inputs = {"input_ids": torch.ones(n, t, dtype=torch.long), "attention_mask": torch.ones(n, t, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref.chosen, "ref_rejected_logps": ref.rejected}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def random_pairs(seed: int, b: int = 6) -> tuple[PairLogps, PairLogps]:
    g = torch.Generator().manual_seed(seed)
    c_len = torch.randint(1, 9, (b,), generator=g)
    r_len = torch.randint(1, 9, (b,), generator=g)
    pol = PairLogps(-3 * c_len * torch.rand(b, generator=g, dtype=torch.float64),
                    -3 * r_len * torch.rand(b, generator=g, dtype=torch.float64), c_len, r_len)
    noise = 2 * torch.rand(2, b, generator=g, dtype=torch.float64) - 1
    ref = PairLogps(pol.chosen + noise[0] * c_len, pol.rejected + noise[1] * r_len, c_len, r_len)
    return pol, ref


@pytest.mark.parametrize(("seed", "name", "beta", "eps"), [
    (0, "sigmoid", 0.1, 0.0), (1, "sigmoid", 0.7, 0.0), (2, "hinge", 0.5, 0.0), (3, "ipo", 0.1, 0.0),
    (4, "ipo", 0.8, 0.0), (5, "robust", 0.4, 0.2), (8, "sigmoid_norm", 2.0, 0.0), (9, "exo_pair", 0.3, 1e-3),
    (10, "exo_pair", 0.6, 0.25), (11, "nca_pair", 0.4, 0.0), (12, "bco_pair", 0.4, 0.0), (13, "sppo_hard", 0.5, 0.0),
    (14, "aot", 0.3, 0.0), (15, "aot", 0.6, 0.1), (16, "aot_unpaired", 0.3, 0.0), (17, "aot_unpaired", 0.5, 0.2),
    (18, "apo_zero", 0.3, 0.0), (19, "apo_down", 0.3, 0.0), (20, "discopop", 0.2, 0.0), (21, "sft", 0.1, 0.0),
])
def test_matches_trl_dpo_trainer(seed, name, beta, eps):
    pol, ref = random_pairs(seed)
    trl_loss, trl_metrics = trl_dpo(name, pol, ref, beta, eps, discopop_tau=0.07)
    out = loss_fn(name)(pol, ref, beta=beta, label_smoothing=eps, discopop_tau=0.07)
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"]:
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-6), key


def _trl_experimental(cls_path: str, **attrs):
    import importlib

    from accelerate import Accelerator

    module, name = cls_path.rsplit(".", 1)
    trainer = object.__new__(getattr(importlib.import_module(module), name))
    trainer.accelerator = Accelerator(cpu=True)
    trainer.is_encoder_decoder, trainer.aux_loss_enabled = False, False
    trainer.pad_token_id = trainer.padding_value = 0
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


def test_cdpo_matches_trl_cpo_sigmoid_on_log_ratios():
    """TRL 1.16's CPO ``sigmoid`` loss is the cDPO form; fed log-ratios it is DPO with label smoothing."""
    pol, ref = random_pairs(seed=7)
    beta, eps = 0.3, 0.15
    cpo = _trl_experimental("trl.experimental.cpo.CPOTrainer", alpha=0.0, loss_type="sigmoid", beta=beta,
                            label_smoothing=eps)
    losses, _, _ = cpo.cpo_loss(pol.chosen - ref.chosen, pol.rejected - ref.rejected)
    out = loss_fn("sigmoid")(pol, ref, beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, use_cache=None, **_):
        return types.SimpleNamespace(logits=self.logits)


def _sequence_batch(seed: int, b: int = 4, t: int = 9, vocab: int = 11, prompt_len: int = 3):
    """TRL-style chosen/rejected tensors (prompt and padding labelled -100), fixed logits, and our PairLogps."""
    g = torch.Generator().manual_seed(seed)
    batch, lens = {}, {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        n_completion = torch.randint(1, t - prompt_len + 1, (b,), generator=g)
        attention = torch.zeros(b, t, dtype=torch.long)
        labels = torch.full((b, t), -100)
        for i in range(b):
            end = prompt_len + int(n_completion[i])
            attention[i, :end] = 1
            labels[i, prompt_len:end] = ids[i, prompt_len:end]
        ids = ids * attention  # pad with token 0
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
        lens[side] = n_completion
    logits = 3 * torch.randn(2 * b, t, vocab, generator=g)
    # our own log-probs of the same logits: token n is predicted at position n - 1
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    scored = labels != -100
    per_token = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (per_token * scored).sum(-1)
    pol = PairLogps(sums[:b], sums[b:], lens["chosen"], lens["rejected"])
    return batch, _FixedLogits(logits), pol


@pytest.mark.parametrize(("cpo_alpha", "eps"), [(0.0, 0.0), (1.0, 0.0), (0.3, 0.1)])
def test_simpo_matches_trl_cpo_trainer(cpo_alpha, eps):
    batch, model, pol = _sequence_batch(seed=3)
    beta, gamma = 2.0, 0.7
    cpo = _trl_experimental("trl.experimental.cpo.CPOTrainer", alpha=0.0, loss_type="simpo", beta=beta,
                            simpo_gamma=gamma, cpo_alpha=cpo_alpha, label_smoothing=eps)
    trl_loss, trl_metrics = cpo.get_batch_loss_metrics(model, batch)
    out = loss_fn("simpo")(pol, None, beta=beta, simpo_gamma=gamma, cpo_alpha=cpo_alpha, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]:
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-6), key


def test_orpo_matches_trl_orpo_trainer():
    """TRL's ORPO NLL covers prompt tokens too; with a one-token prompt (never predicted) both cover the same."""
    batch, model, pol = _sequence_batch(seed=5, prompt_len=1)
    lam = 0.25
    orpo = _trl_experimental("trl.experimental.orpo.ORPOTrainer", beta=lam)
    trl_loss, trl_metrics = orpo.get_batch_loss_metrics(model, batch)
    out = loss_fn("orpo")(pol, None, beta=lam)
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll_loss",
                "log_odds_ratio", "log_odds_chosen"]:
        assert out.metrics[key].item() == pytest.approx(float(trl_metrics[key]), abs=1e-6), key


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "exo_pair", "discopop"])
@pytest.mark.parametrize(("divergence", "coef"), [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                  ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
def test_f_divergences_match_trl_dpo_trainer(name, divergence, coef):
    # float32: TRL's alpha-divergence clamp has no float64 entry
    pol, ref = (PairLogps(p.chosen.float(), p.rejected.float(), p.chosen_len, p.rejected_len)
                for p in random_pairs(seed=len(name) + int(10 * coef)))
    beta, eps = 0.4, (0.1 if name in ("robust", "exo_pair") else 0.0)
    trl_loss, trl_metrics = trl_dpo(name, pol, ref, beta, eps, f_divergence_type=divergence,
                                    f_alpha_divergence_coef=coef)
    out = loss_fn(name)(pol, ref, beta=beta, label_smoothing=eps, f_divergence_type=divergence,
                        f_alpha_divergence_coef=coef)
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=2e-6, abs=2e-6)  # float32 rounding
    assert out.metrics["rewards/margins"].item() == pytest.approx(trl_metrics["rewards/margins"], abs=2e-6)


def test_f_divergence_scores_by_hand():
    from hfrlhf.losses.preference import f_divergence_scores

    h = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    u = [math.exp(x) for x in h.tolist()]
    # f'(u) up to a constant: forward KL f(u) = -log u -> -1/u (+1); JS -> log(2u / (1 + u)); alpha -> u^(a-1)
    assert f_divergence_scores(h, "forward_kl").tolist() == pytest.approx([1 - 1 / x for x in u])
    assert f_divergence_scores(h, "js_divergence").tolist() == pytest.approx([math.log(2 * x / (1 + x)) for x in u])
    a = 0.3
    assert f_divergence_scores(h, "alpha_divergence", a).tolist() == pytest.approx([(x ** (a - 1) - 1) / (a - 1)
                                                                                    for x in u])
    assert torch.equal(f_divergence_scores(h, "alpha_divergence", 1.0), h)  # the limit a -> 1 is reverse KL
    assert torch.equal(f_divergence_scores(h), h)
    # every form is increasing in h, so a larger log-ratio always means a larger implicit reward
    for kind in ["forward_kl", "js_divergence", "alpha_divergence"]:
        assert (f_divergence_scores(h, kind).diff() > 0).all(), kind
    with pytest.raises(ValueError, match="f_divergence_type"):
        f_divergence_scores(h, "kl")


def test_losses_without_an_f_divergence_form_refuse_one():
    for name in ["rdpo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired"]:
        with pytest.raises(ValueError, match="f-divergence"):
            loss_fn(name)(POL, REF, f_divergence_type="forward_kl")
        loss_fn(name)(POL, REF, f_divergence_type="reverse_kl")  # the default is fine
