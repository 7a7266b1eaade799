"""KTO and its unpaired APO-zero variant: losses on completions labelled desirable or undesirable, one at a time.

Kahneman-Tversky Optimization (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv:2402.01306). For example ``i`` with completion log-probs summed over its tokens,

    r_i  = log pi_theta(y_i | x_i) - log pi_ref(y_i | x_i)           implied reward (divided by beta)
    z_0  = max(0, mean_j [log pi_theta(y'_j | x_j) - log pi_ref(y'_j | x_j)])   reference point, no gradient
    v_i  = lambda_D * sigmoid(beta * (r_i - z_0))    if y_i is desirable
           lambda_U * sigmoid(beta * (z_0 - r_i))    if y_i is undesirable
    L    = 1/B * sum_i (lambda_i - v_i)                                    (paper eq. 7)

where ``y'_j`` are mismatched completions (another example's completion under prompt ``x_j``) and ``B`` is
the number of examples in the batch on this process. Written per kind, the normalisation TRL 1.16 uses is

    L = (lambda_D * sum_{i in D} (1 - sigmoid(beta (r_i - z_0)))
         + lambda_U * sum_{i in U} (1 - sigmoid(beta (z_0 - r_i)))) / (n_D + n_U),

a single mean over the whole batch, *not* a mean per kind: a batch with more undesirable examples weighs
the undesirable term more. Each process averages over its own examples; DDP then averages the gradients.

Metrics are **sums over the batch** (plus the counts), so that a trainer can add them over processes and
accumulation steps and divide once, which is what TRL's per-step gather computes; they are never nan, and
every key is present on every process even when a kind is missing there. :func:`kto_log_metrics` turns
the accumulated sums into the means TRL logs (``rewards/chosen``, ``rewards/margins``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from hfrlhf.losses.base import LossOutput, register_loss

__all__ = [
    "SUM_METRICS",
    "apo_zero_unpaired_loss",
    "desirable_undesirable_warning",
    "kto_log_metrics",
    "kto_loss",
    "kto_reference_point",
]

# Metric keys summed over examples; ``kl`` is a per-batch value and is averaged, never summed.
SUM_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "count/chosen",
    "count/rejected",
)


def kto_reference_point(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """KTO's reference point ``z_0 = max(0, mean_j [log pi_theta(y'_j|x_j) - log pi_ref(y'_j|x_j)])``.

    An estimate of KL(pi_theta || pi_ref) from mismatched pairs: it is detached, so no
    gradient flows through it, and clamped at 0 because a KL cannot be negative.

    Args:
        policy_kl_logps: summed log-probs of the mismatched completions under the policy, ``(M,)``.
        ref_kl_logps: the same under the reference model, ``(M,)``.
        gather: optional callable that all-gathers a ``(M,)`` tensor over processes (for example
            ``accelerator.gather_for_metrics``); the mean is then over every process's pairs, and every
            process gets the same ``z_0``. (TRL averages per-process means instead; the two agree when
            every process holds the same number of pairs.)

    Returns:
        A scalar tensor ``()``; 0 when there are no pairs.

    >>> kto_reference_point(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -5.0]))
    tensor(0.5000)
    >>> kto_reference_point(torch.tensor([-6.0]), torch.tensor([-4.0]))
    tensor(0.)
    """
    log_ratio = (policy_kl_logps - ref_kl_logps).detach()
    if gather is not None:
        log_ratio = gather(log_ratio)
    if log_ratio.numel() == 0:
        return log_ratio.new_zeros(())
    return log_ratio.mean().clamp(min=0)


def _check(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape or labels.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps and labels must all be (B,); got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(labels.shape)}"
        )
    return labels.to(device=policy_logps.device, dtype=torch.bool)


def _unpaired_output(
    per_example: torch.Tensor,
    policy_logps: torch.Tensor,
    logratios: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    kl: torch.Tensor,
) -> LossOutput:
    """Mean the weighted per-example losses over the batch and build the summed metrics."""
    # Every element of policy_logps reaches the loss through torch.where (with zero gradient for the
    # branch not taken), so the graph is the same on every process whatever mix of labels it holds.
    # An empty batch still gives a 0 that is connected to the graph, so DDP's backward does not hang.
    loss = per_example.sum() / max(per_example.numel(), 1)
    with torch.no_grad():
        rewards = beta * logratios.detach()
        logps = policy_logps.detach()
        zero = torch.zeros_like(rewards)
        chosen, rejected = labels, ~labels
        metrics = {
            "rewards/chosen": torch.where(chosen, rewards, zero).sum(),
            "rewards/rejected": torch.where(rejected, rewards, zero).sum(),
            "logps/chosen": torch.where(chosen, logps, zero).sum(),
            "logps/rejected": torch.where(rejected, logps, zero).sum(),
            "count/chosen": chosen.sum().to(rewards.dtype),
            "count/rejected": rejected.sum().to(rewards.dtype),
            "kl": kl.detach().to(rewards.dtype).reshape(()),
        }
    return LossOutput(loss, metrics)


@register_loss("kto", "kto", needs=("kl",))
def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """The KTO loss (module docstring; Ethayarajh et al., 2024, eq. 7; TRL ``loss_type="kto"``).

        L = 1/B * sum_i  lambda_D (1 - sigmoid(beta (r_i - z_0)))   for desirable i
                         lambda_U (1 - sigmoid(beta (z_0 - r_i)))   for undesirable i

    Args:
        policy_logps: summed completion log-probs under the policy, ``(B,)``.
        ref_logps: the same under the reference model, ``(B,)``.
        labels: True for a desirable completion, ``(B,)`` bool.
        kl: the reference point ``z_0``, a scalar tensor already detached, clamped and gathered by the
            caller (see :func:`kto_reference_point`).
        beta: temperature of the implied reward.
        desirable_weight, undesirable_weight: ``lambda_D`` and ``lambda_U``.

    Returns:
        ``LossOutput(loss, metrics)``: a scalar loss ``()`` and the summed metrics of the module docstring.

    >>> out = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([True, False]),
    ...                kl=torch.tensor(0.0))
    >>> out.loss  # both examples sit at sigmoid(0) = 0.5
    tensor(0.5000)
    """
    labels = _check(policy_logps, ref_logps, labels)
    logratios = policy_logps - ref_logps
    z0 = kl.detach().to(logratios.dtype).reshape(())
    desirable = desirable_weight * (1 - F.sigmoid(beta * (logratios - z0)))
    undesirable = undesirable_weight * (1 - F.sigmoid(beta * (z0 - logratios)))
    per_example = torch.where(labels, desirable, undesirable)
    return _unpaired_output(per_example, policy_logps, logratios, labels, beta, z0)


@register_loss("kto", "apo_zero_unpaired")
def apo_zero_unpaired_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Unpaired APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive
    Revisions", eq. 7, applied to one completion at a time; TRL ``loss_type="apo_zero_unpaired"``).

        L = 1/B * sum_i  lambda_D (1 - sigmoid(beta r_i))   for desirable i   (push its likelihood up)
                         lambda_U sigmoid(beta r_i)         for undesirable i (push its likelihood down)

    Anchored at 0 instead of a KL reference point, so it needs no mismatched pairs; ``kl`` is accepted for a
    uniform call signature and ignored, and the ``kl`` metric is 0 (as TRL logs it).

    Shapes and metrics as :func:`kto_loss`.

    >>> out = apo_zero_unpaired_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([False]))
    >>> out.loss
    tensor(0.5000)
    """
    labels = _check(policy_logps, ref_logps, labels)
    logratios = policy_logps - ref_logps
    desirable = desirable_weight * (1 - F.sigmoid(beta * logratios))
    undesirable = undesirable_weight * F.sigmoid(beta * logratios)
    per_example = torch.where(labels, desirable, undesirable)
    return _unpaired_output(per_example, policy_logps, logratios, labels, beta, logratios.new_zeros(()))


def kto_log_metrics(totals: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Turn summed KTO metrics into the means TRL logs.

    ``totals`` holds, for each key of :data:`SUM_METRICS`, the sum over processes and steps of what
    :func:`kto_loss` returned, and optionally ``kl`` already averaged over steps (it is the same on every
    process, so it is averaged, not summed). Per-kind means are omitted when that kind never occurred, and
    ``rewards/margins`` only appears when both did, exactly like TRL's KTO logs.

    >>> kto_log_metrics({"rewards/chosen": 3.0, "count/chosen": 2, "rewards/rejected": -1.0,
    ...                  "count/rejected": 1, "logps/chosen": -8.0, "logps/rejected": -5.0, "kl": 0.25})
    {'rewards/chosen': 1.5, 'logps/chosen': -4.0, 'rewards/rejected': -1.0, 'logps/rejected': -5.0, 'rewards/margins': 2.5, 'kl': 0.25}
    """

    def num(key: str) -> float:
        value = totals.get(key, 0.0)
        return float(value.item() if isinstance(value, torch.Tensor) else value)

    out: dict[str, float] = {}
    for kind in ("chosen", "rejected"):
        count = num(f"count/{kind}")
        if count > 0:
            out[f"rewards/{kind}"] = num(f"rewards/{kind}") / count
            out[f"logps/{kind}"] = num(f"logps/{kind}") / count
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if "kl" in totals:
        out["kl"] = num("kl")
    return out


def desirable_undesirable_warning(
    num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> str | None:
    """A warning when the weighted class balance is outside the paper's recommended range, else None.

    Ethayarajh et al. (2024, eq. 8) recommend

        1 <= (lambda_D * n_D) / (lambda_U * n_U) <= 4/3,

    i.e. ``lambda_D`` in ``[lambda_U n_U / n_D, 4/3 * lambda_U n_U / n_D]`` with ``lambda_U`` fixed, or
    ``lambda_U`` in ``[3/4 * lambda_D n_D / n_U, lambda_D n_D / n_U]`` with ``lambda_D`` fixed. The message
    gives both ranges (change one weight, not both).

    >>> desirable_undesirable_warning(100, 100) is None
    True
    >>> print(desirable_undesirable_warning(100, 300))  # doctest: +ELLIPSIS
    The weighted ratio desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = 0.333 is ...
    """
    if num_desirable <= 0 or num_undesirable <= 0:
        present = "desirable" if num_desirable > 0 else "undesirable"
        if num_desirable <= 0 and num_undesirable <= 0:
            return "The dataset has no labelled examples."
        return (
            f"The dataset has only {present} examples. KTO still trains, but the weighted ratio "
            "desirable_weight * n_desirable / (undesirable_weight * n_undesirable) recommended by the KTO paper "
            "(between 1 and 4/3) cannot be reached."
        )
    ratio = (desirable_weight * num_desirable) / (undesirable_weight * num_undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0 + 1e-12:
        return None
    d_low = undesirable_weight * num_undesirable / num_desirable
    u_high = desirable_weight * num_desirable / num_undesirable
    return (
        f"The weighted ratio desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.3g} "
        f"is outside [1, 4/3], the range recommended by the KTO paper (n_desirable={num_desirable}, "
        f"n_undesirable={num_undesirable}). Set EITHER desirable_weight in [{d_low:.3g}, {4 / 3 * d_low:.3g}] "
        f"OR undesirable_weight in [{0.75 * u_high:.3g}, {u_high:.3g}], not both."
    )
