"""Reductions over the real (unmasked) entries of a tensor, and running moments for reward scaling.

Every function takes ``mask`` with the shape of ``x`` (bool, or 0/1 of any dtype); True/1 marks a real
entry, False/0 a pad. Pads are selected away with ``torch.where`` rather than multiplied by zero, so a pad
holding ``inf`` or ``nan`` (an invalid log-prob, say) never leaks into a result.

Whitening follows lm-human-preference-details (Huang et al., 2023, "The N Implementation Details of RLHF
with PPO"): the variance is the *biased* one (``unbiased=False``) and ``1e-8`` is added before the rsqrt.

Functions that reduce over the whole tensor accept ``all_reduce``, a callable that sums a tensor across
processes and returns the sum (for example ``lambda t: accelerator.reduce(t, "sum")``), so statistics are
taken over the global batch rather than each process's shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _as_bool(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of the real entries of ``x``: ``sum_i m_i x_i``.

    Shapes: ``x`` and ``mask`` ``(...)``; returns a scalar, or ``x`` with ``dim`` reduced.

    >>> masked_sum(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]]))
    tensor(3.)
    """
    kept = torch.where(_as_bool(mask, x), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the real entries of ``x``: ``sum_i m_i x_i / sum_i m_i``.

    A slice with no real entry has mean 0 (not nan), so an all-pad row cannot poison a loss.

    Shapes: ``x`` and ``mask`` ``(...)``; returns a scalar, or ``x`` with ``dim`` reduced.

    >>> masked_mean(torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]), dim=1)
    tensor([1.5000, 4.0000])
    """
    m = _as_bool(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def _moments(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) over all real entries, optionally over every process."""
    m = _as_bool(mask, x)
    stats = torch.stack([masked_sum(x, m), m.sum().to(x.dtype)])
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, count = stats[0], stats[1]
    mean = total / count.clamp(min=1)
    sq = masked_sum((x - mean) ** 2, m)
    if all_reduce is not None:
        sq = all_reduce(sq)
    return mean, sq / count.clamp(min=1), count


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, all_reduce: AllReduce | None = None
) -> torch.Tensor:
    """Variance of the real entries of ``x`` (a scalar).

    ``var = sum_i m_i (x_i - mean)^2 / n``, times ``n / (n - 1)`` (Bessel) when ``unbiased``, with
    ``n = sum_i m_i``. No spread can be estimated from fewer than one (biased) or two (unbiased) entries;
    the variance is then 0 rather than nan.

    Shapes: ``x`` and ``mask`` ``(...)``; returns ``()``.

    >>> masked_var(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]), unbiased=False)
    tensor(1.)
    >>> masked_var(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]))
    tensor(2.)
    """
    _, var, count = _moments(x, mask, all_reduce)
    if unbiased:
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.zeros_like(var))
    return var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """Normalise the real entries of ``x`` to zero mean and unit variance; pads become 0.

    ``y_i = (x_i - mean) / sqrt(var + eps)`` with the biased variance over the real entries (as
    lm-human-preference-details and CleanRL's ``whiten``). With ``shift_mean=False`` the mean is added
    back (``y_i + mean``): the spread is normalised but the average is kept, for quantities such as
    rewards whose level carries meaning.

    Shapes: ``x`` and ``mask`` ``(...)``; returns the shape of ``x``.

    >>> masked_whiten(torch.tensor([[1.0, 3.0, 7.0]]), torch.tensor([[1, 1, 0]]))
    tensor([[-1.,  1.,  0.]])
    """
    m = _as_bool(mask, x)
    mean, var, _ = _moments(x, m, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


class RunningMoments:
    """Running mean and standard deviation of every value ever passed to :meth:`update`.

    Batches are merged with Chan et al.'s parallel update (Chan, Golub & LeVeque, 1979, "Updating formulae
    and a pairwise algorithm for computing sample variances"): for the running ``(mu_a, M2_a, n_a)`` and a
    batch ``(mu_b, M2_b, n_b)``, with ``d = mu_b - mu_a`` and ``n = n_a + n_b``,
    ``mu = mu_a + d n_b / n`` and ``M2 = M2_a + M2_b + d^2 n_a n_b / n`` (``M2`` = sum of squared
    deviations). State is kept in Python floats (float64), so it is exact enough over millions of values and
    goes into a checkpoint as plain numbers.

    Args:
        all_reduce: optional callable summing a tensor over processes; with it every process sees the
            statistics of the global batch and keeps identical state.

    >>> rm = RunningMoments()
    >>> rm.update(torch.tensor([1.0, 2.0]))
    (1.5, 0.7071067811865476)
    >>> rm.update(torch.tensor([3.0, 4.0]))
    (3.5, 0.7071067811865476)
    >>> rm.mean, round(rm.std, 6), rm.count
    (2.5, 1.290994, 4)
    """

    def __init__(self, all_reduce: AllReduce | None = None) -> None:
        self.all_reduce = all_reduce
        self.mean = 0.0
        self.var = 0.0  # biased (population) variance of everything seen so far
        self.count = 0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen so far (1.0 before two values are seen)."""
        if self.count < 2:
            return 1.0
        return (self.var * self.count / (self.count - 1)) ** 0.5

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
        """Fold the real entries of ``x`` into the running moments.

        Returns the batch's own ``(mean, unbiased std)`` (std 0.0 for fewer than two values). An empty batch
        leaves the state unchanged and returns ``(0.0, 0.0)``.
        """
        x = x.detach().to(torch.float64)
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else _as_bool(mask, x)
        batch_mean_t, batch_var_t, batch_count_t = _moments(x, m, self.all_reduce)
        n_b = int(round(batch_count_t.item()))
        if n_b == 0:
            return 0.0, 0.0
        mu_b, var_b = batch_mean_t.item(), batch_var_t.item()
        n_a = self.count
        n = n_a + n_b
        delta = mu_b - self.mean
        m2 = self.var * n_a + var_b * n_b + delta * delta * n_a * n_b / n
        self.mean += delta * n_b / n
        self.var = m2 / n
        self.count = n
        batch_std = (var_b * n_b / (n_b - 1)) ** 0.5 if n_b > 1 else 0.0
        return mu_b, batch_std

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers for a checkpoint."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
