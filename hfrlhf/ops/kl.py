"""Per-token KL estimators and the KL-coefficient controllers of PPO-style RLHF.

Estimators (Schulman, 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html): tokens
are sampled from the policy ``p``; ``q`` is the reference. With ``log r = log q - log p`` per token,

- ``k1 = -log r = log p - log q``          unbiased for KL(p || q), high variance, can be negative;
- ``k2 = 0.5 (log r)^2``                   biased, low variance, always >= 0;
- ``k3 = (r - 1) - log r``                 unbiased, low variance, always >= 0.

Controllers (Ziegler et al., 2019, "Fine-Tuning Language Models from Human Preferences"):
the reward is ``score - beta * KL`` and ``beta`` is either fixed or adapted towards a target KL.
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["k1", "k2", "k3"]


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Estimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens.

    Args:
        logprobs: log p(token) under the policy that sampled it, ``(B, T)`` (any shape).
        ref_logprobs: log q(token) under the reference model, same shape.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).

    Returns:
        The estimate per token, same shape. Pads are not masked here.

    >>> lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    >>> kl_estimate(lp, ref, "k1"), kl_estimate(lp, ref, "k2")
    (tensor([1.]), tensor([0.5000]))
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(logprobs.shape)} vs {tuple(ref_logprobs.shape)}")
    log_ratio = ref_logprobs - logprobs  # log r = log q - log p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of ['k1', 'k2', 'k3']")


class FixedKLController:
    """A constant KL coefficient: ``value`` never changes.

    >>> ctl = FixedKLController(0.05)
    >>> ctl.update(current_kl=10.0, n_steps=64)
    >>> ctl.value
    0.05
    """

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op, so both controllers can be driven by the same loop."""

    def state_dict(self) -> dict[str, float]:
        """Plain numbers for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards ``target`` (Ziegler et al., 2019, eq. 2).

    After a batch covering ``n_steps`` samples with mean KL ``KL_t``:

        e_t = clip(KL_t / target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)

    Args:
        init_beta: the starting coefficient.
        target: the KL (nats per sequence, as measured by the caller) to steer towards.
        horizon: how many samples it takes to correct a proportional error of 1 (the paper uses 10,000).

    >>> ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    >>> ctl.update(current_kl=12.0, n_steps=1000)  # error 1.0 is clipped to 0.2
    >>> round(ctl.value, 6)
    0.102
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Move ``value`` by the clipped proportional error of ``current_kl``."""
        kl = float(current_kl.item() if isinstance(current_kl, torch.Tensor) else current_kl)
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Plain numbers for a checkpoint (the current coefficient; target and horizon come from config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.value = float(state["value"])
