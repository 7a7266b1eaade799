"""Reward functions PPO can use instead of a reward model: ``--reward_fn vader`` or ``--reward_fn pkg.mod:fn``.

A reward function takes the prompts (text or chat messages, as in the data) and the decoded completions
and returns one float per completion, higher is better.

>>> scores = vader_sentiment(["Review the film."] * 2, ["I loved it, wonderful!", "Boring and awful."])
>>> [round(s, 2) for s in scores]
[0.84, -0.65]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["REWARD_FUNCTIONS", "RewardFn", "get_reward_fn", "vader_sentiment"]

RewardFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


@lru_cache(maxsize=1)
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("--reward_fn vader needs the vaderSentiment package: pip install vadersentiment") from None
    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (rule-based, lexicon bundled, offline).

    The stand-in "gold" reward of the controlled-sentiment experiment: positive answers score high.
    """
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


REWARD_FUNCTIONS: dict[str, RewardFn] = {"vader": vader_sentiment}
"""Built-in reward functions by name."""


def get_reward_fn(name: str) -> RewardFn:
    """A built-in reward function by name, or any importable callable as ``package.module:function``.

    >>> get_reward_fn("vader") is vader_sentiment
    True
    >>> get_reward_fn("hfrlhf.workflows.rewards:vader_sentiment") is vader_sentiment
    True
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise ValueError(f"reward_fn {name!r}: {module} has no callable {attr!r}")
        return fn
    raise ValueError(f"unknown reward_fn {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or 'package.module:function'")
