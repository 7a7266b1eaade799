"""KTO losses: hand-worked values, edge cases, and TRL 1.16's KTOTrainer run on the same numbers."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from hfrlhf.losses.base import available_losses, get_loss
from hfrlhf.losses.kto import (
    SUM_METRICS,
    apo_zero_unpaired_loss,
    desirable_undesirable_warning,
    kto_log_metrics,
    kto_loss,
    kto_reference_point,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- TRL harness -------------------------------------------------------------------------------------------
# TRL 1.16 has no standalone KTO loss function: the loss is computed inline in KTOTrainer._compute_loss.
# We run that method on a bare instance whose "model" returns chosen per-row log-probs, so TRL sees exactly
# the tensors our function gets (reference log-probs come in precomputed, as with precompute_ref_log_probs).


class _FakeLM:
    """Row r of ``input_ids`` (first column = row id into ``table``) gets one scored token of log-prob table[r]."""

    training = True

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, input_ids: torch.Tensor, **kwargs: object) -> types.SimpleNamespace:
        logps = self.table[input_ids[:, 0]].unsqueeze(1)  # (B, 1): sequence length 2 -> 1 scored position
        zeros = torch.zeros_like(logps).detach()
        return types.SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)


class _IdentityAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) if x.dim() == 0 else x


def trl_kto(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    policy_kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """TRL's loss, its logged metrics, and the gradient of the loss w.r.t. ``policy_logps``."""
    from trl import KTOTrainer

    batch_size = policy_logps.shape[0]
    calculate_kl = policy_kl_logps is not None
    leaf = policy_logps.detach().clone().requires_grad_(True)
    table = torch.cat([leaf, policy_kl_logps.detach()]) if calculate_kl else leaf
    trainer = object.__new__(KTOTrainer)
    trainer.model = _FakeLM(table)
    trainer.accelerator = _IdentityAccelerator()
    trainer.calculate_KL = calculate_kl
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer.loss_type = loss_type
    trainer.beta = beta
    trainer.desirable_weight = desirable_weight
    trainer.undesirable_weight = undesirable_weight
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    rows = torch.arange(batch_size)
    batch = {
        "input_ids": torch.stack([rows, rows], dim=1),
        "attention_mask": torch.ones(batch_size, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * batch_size),
        "label": labels.clone(),
        "ref_logps": ref_logps.clone(),
    }
    if calculate_kl:
        kl_rows = rows + batch_size
        batch.update(
            KL_input_ids=torch.stack([kl_rows, kl_rows], dim=1),
            KL_attention_mask=torch.ones(batch_size, 2, dtype=torch.long),
            KL_completion_mask=torch.tensor([[0, 1]] * batch_size),
            ref_KL_logps=ref_kl_logps.clone(),
        )
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    # entropy, num_tokens and logits/* come from the model outputs, not the loss: the trainer's business.
    model_side = ("entropy", "num_tokens", "logits/chosen", "logits/rejected")
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k not in model_side}
    return loss.detach(), metrics, leaf.grad


def ours(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps, *, loss_type="kto", **kw):
    leaf = policy_logps.detach().clone().requires_grad_(True)
    if policy_kl_logps is None:
        kl = torch.tensor(0.0)
    else:
        kl = kto_reference_point(policy_kl_logps, ref_kl_logps)
    out = get_loss("kto", loss_type).fn(leaf, ref_logps, labels, kl=kl, **kw)
    out.loss.backward()
    return out, leaf.grad


CASES = [
    # (labels, beta, desirable_weight, undesirable_weight)
    ([True, False, True, False], 0.1, 1.0, 1.0),
    ([True, True, True, False, False], 0.5, 1.0, 1.0),
    ([False, True, False, False, False, False], 0.2, 2.5, 0.7),
    ([True, True, True], 0.1, 1.3, 1.0),  # only desirable
    ([False, False], 1.0, 1.0, 3.0),  # only undesirable
]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("labels, beta, w_d, w_u", CASES)
def test_matches_trl_kto_trainer(loss_type, labels, beta, w_d, w_u):
    g = torch.Generator().manual_seed(len(labels) * 7 + int(beta * 10))
    n = len(labels)
    policy = -20 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    ref = policy + 4 * torch.randn(n, generator=g, dtype=torch.float64)
    labels_t = torch.tensor(labels)
    if loss_type == "kto":
        policy_kl = -20 * torch.rand(n, generator=g, dtype=torch.float64)
        ref_kl = policy_kl - 3 * torch.rand(n, generator=g, dtype=torch.float64)  # positive KL estimate
    else:
        policy_kl = ref_kl = None
    kw = dict(beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    trl_loss, trl_metrics, trl_grad = trl_kto(
        policy, ref, labels_t, policy_kl, ref_kl, loss_type=loss_type, **kw
    )
    out, grad = ours(policy, ref, labels_t, policy_kl, ref_kl, loss_type=loss_type, **kw)

    torch.testing.assert_close(out.loss, trl_loss.reshape(()))
    torch.testing.assert_close(grad, trl_grad)
    logged = kto_log_metrics(out.metrics)
    assert set(logged) == set(trl_metrics), (logged, trl_metrics)
    for key, value in trl_metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_kto_by_hand():
    # r = policy - ref = [2, -1, 4]; z0 = 1; beta = 0.5; weights D=2, U=3
    policy = torch.tensor([-3.0, -6.0, -1.0], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0, -5.0])
    labels = torch.tensor([True, False, False])
    out = kto_loss(
        policy, ref, labels, kl=torch.tensor(1.0), beta=0.5, desirable_weight=2.0, undesirable_weight=3.0
    )
    # desirable: 2 * (1 - sig(0.5*(2-1))); undesirable: 3 * (1 - sig(0.5*(1-(-1)))), 3 * (1 - sig(0.5*(1-4)))
    expected = (2 * (1 - sig(0.5)) + 3 * (1 - sig(1.0)) + 3 * (1 - sig(-1.5))) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (-1 + 4))
    assert m["logps/chosen"].item() == pytest.approx(-3.0)
    assert m["logps/rejected"].item() == pytest.approx(-7.0)
    assert m["count/chosen"].item() == 1 and m["count/rejected"].item() == 2
    assert m["kl"].item() == pytest.approx(1.0)
    assert all(not v.requires_grad for v in m.values())
    # d/dpolicy of 2*(1 - sig(0.5 (r - 1)))/3 at r=2 is -2 * 0.5 * sig'(0.5) / 3
    out.loss.backward()
    dsig = sig(0.5) * (1 - sig(0.5))
    assert policy.grad[0].item() == pytest.approx(-2 * 0.5 * dsig / 3, rel=1e-6)


def test_apo_zero_by_hand():
    policy = torch.tensor([-2.0, -2.0])
    ref = torch.tensor([-4.0, -4.0])  # r = 2 for both
    out = apo_zero_unpaired_loss(policy, ref, torch.tensor([True, False]), beta=0.5, undesirable_weight=2.0)
    assert out.loss.item() == pytest.approx(((1 - sig(1.0)) + 2 * sig(1.0)) / 2, rel=1e-6)
    assert out.metrics["kl"].item() == 0.0


@pytest.mark.parametrize("labels", [[True, True, True], [False, False, False], [True], [False]])
def test_single_kind_and_batch_of_one(labels):
    policy = torch.linspace(-3.0, -1.0, len(labels)).requires_grad_(True)
    ref = torch.full((len(labels),), -2.0)
    out = kto_loss(policy, ref, torch.tensor(labels), kl=torch.tensor(0.3))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad != 0).all()
    assert set(out.metrics) == set(SUM_METRICS) | {"kl"}
    assert all(torch.isfinite(v) for v in out.metrics.values())
    absent = "rejected" if labels[0] else "chosen"
    assert out.metrics[f"count/{absent}"].item() == 0
    assert out.metrics[f"rewards/{absent}"].item() == 0
    logged = kto_log_metrics(out.metrics)
    assert f"rewards/{absent}" not in logged and "rewards/margins" not in logged
    assert all(math.isfinite(v) for v in logged.values())


def test_empty_kind_still_touches_graph():
    # A process holding only undesirable examples must still build a graph over every input so that
    # DDP's gradient all-reduce sees the same parameters on every rank.
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = kto_loss(policy, torch.tensor([-1.5, -1.5]), torch.tensor([False, False]), kl=torch.tensor(0.0))
    assert out.loss.grad_fn is not None
    # Empty batch: 0, connected to the graph, never nan.
    empty = torch.zeros(0, requires_grad=True)
    out = kto_loss(empty, torch.zeros(0), torch.zeros(0, dtype=torch.bool), kl=torch.tensor(0.0))
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_kl_is_not_differentiated_through():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl = torch.tensor(0.5, requires_grad=True)
    out = kto_loss(policy, torch.tensor([-1.5, -1.5]), torch.tensor([True, False]), kl=kl)
    out.loss.backward()
    assert kl.grad is None


def test_reference_point():
    p, r = torch.tensor([-1.0, -4.0, -2.0], requires_grad=True), torch.tensor([-2.0, -2.0, -3.0])
    z0 = kto_reference_point(p, r)
    assert z0.item() == pytest.approx((1 - 2 + 1) / 3) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0  # clamped
    # gather sees every process's pairs: mean over (1, -2, 1, 4) -> 1.0
    other = torch.tensor([4.0])
    z0 = kto_reference_point(p, r, gather=lambda t: torch.cat([t, other]))
    assert z0.item() == pytest.approx(1.0)
    assert kto_reference_point(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_log_metrics_accumulates_across_steps():
    # Two steps with different counts: the logged mean is over all examples, not a mean of step means.
    s1 = kto_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([True]), kl=torch.tensor(0.0)
    ).metrics
    s2 = kto_loss(
        torch.tensor([-2.0, -2.0, -9.0]),
        torch.tensor([-2.0, -2.0, -8.0]),
        torch.tensor([True, True, False]),
        kl=torch.tensor(0.0),
    ).metrics
    totals = {k: s1[k] + s2[k] for k in SUM_METRICS}
    logged = kto_log_metrics(totals)
    assert logged["rewards/chosen"] == pytest.approx(0.1 * (2 + 0 + 0) / 3)
    assert logged["rewards/rejected"] == pytest.approx(0.1 * -1)
    assert logged["rewards/margins"] == pytest.approx(0.1 * 2 / 3 + 0.1)
    assert logged["logps/chosen"] == pytest.approx(-5.0 / 3)
    assert "kl" not in logged


def test_registry():
    assert {"kto", "apo_zero_unpaired"} <= set(available_losses("kto"))
    assert get_loss("kto", "kto").needs == ("kl",)
    assert get_loss("kto", "apo_zero_unpaired").needs == ()
    assert not get_loss("kto", "kto").reference_free


def test_desirable_undesirable_warning():
    assert desirable_undesirable_warning(100, 100) is None
    assert desirable_undesirable_warning(130, 100) is None  # ratio 1.3
    assert desirable_undesirable_warning(100, 100, 1.0, 1.0) is None
    assert desirable_undesirable_warning(100, 100, 1.5, 1.0) is not None  # ratio 1.5
    assert desirable_undesirable_warning(100, 100, 0.9, 1.0) is not None  # ratio 0.9
    # 1:3 imbalance: lambda_D in [3, 4] (lambda_U=1) or lambda_U in [0.25, 1/3] (lambda_D=1)
    msg = desirable_undesirable_warning(100, 300)
    assert msg is not None and "[3, 4]" in msg and "[0.25, 0.333]" in msg
    assert desirable_undesirable_warning(100, 300, desirable_weight=3.5) is None
    assert desirable_undesirable_warning(100, 300, undesirable_weight=0.3) is None
    assert "only desirable" in desirable_undesirable_warning(10, 0)
    assert "only undesirable" in desirable_undesirable_warning(0, 10)
