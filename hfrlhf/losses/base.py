"""What every loss returns, and the registry that finds a loss by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """A scalar loss to backpropagate and detached metrics to log (names as TRL logs them)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function plus the capability flags trainers ask about."""

    name: str
    fn: Callable[..., LossOutput]
    family: str
    reference_free: bool = False
    listwise: bool = False
    needs: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[tuple[str, str], LossSpec] = {}


def register_loss(
    family: str, name: str, *, reference_free: bool = False, listwise: bool = False, needs: tuple[str, ...] = ()
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Decorator: ``@register_loss("preference", "ipo")`` makes ``get_loss("preference", "ipo")`` find it."""

    def wrap(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        key = (family, name)
        known = _REGISTRY.get(key)
        # the same function registered again (a module imported twice, e.g. by doctest) is fine; a clash is not
        if known is not None and known.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"loss {name!r} is already registered in family {family!r}")
        _REGISTRY[key] = LossSpec(name, fn, family, reference_free, listwise, tuple(needs))
        return fn

    return wrap


def get_loss(family: str, name: str) -> LossSpec:
    """Look a loss up by family and name; the error lists what exists."""
    try:
        return _REGISTRY[(family, name)]
    except KeyError:
        known = sorted(n for f, n in _REGISTRY if f == family)
        raise ValueError(f"unknown {family} loss_type {name!r}; choose one of {known}") from None


def available_losses(family: str) -> list[str]:
    """Names registered in one family, sorted."""
    return sorted(n for f, n in _REGISTRY if f == family)
