"""Training curves from ``trainer.state.log_history`` as one PNG (matplotlib, Agg backend: no display needed).

Each panel shows one quantity, its training values and, when logged, its evaluation values
(``eval_<name>``); panels whose metrics were never logged are left out. What is drawn: the loss; the
reward margin and preference accuracy (reward models, DPO, KTO); the KL to the reference and the scores
(PPO, and KL for the direct methods).

>>> history = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0}, {"step": 2, "loss": 0.61, "rewards/margins": 0.2},
...            {"step": 2, "eval_loss": 0.65}]
>>> [title for title, _ in panels(history)]
['loss', 'reward margin']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PANELS", "panels", "plot_log_history", "PNG_MAGIC"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (panel title, metric names tried in order; the first one logged is drawn)
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("reward margin", ("rewards/margins", "margin", "rewards/margin")),
    ("preference accuracy", ("rewards/accuracies", "accuracy", "rewards/accuracy")),
    ("KL to reference", ("objective/kl", "kl")),
    ("score", ("objective/scores", "objective/rlhf_reward", "scores", "score")),
)

Series = dict[str, tuple[list[float], list[float]]]  # label -> (steps, values)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and value == value:  # skips NaN
            steps.append(float(entry.get("step", len(steps))))
            values.append(float(value))
    return steps, values


def panels(history: Sequence[dict[str, Any]]) -> list[tuple[str, Series]]:
    """The panels that have data: ``[(title, {"train": (steps, values), "eval": ...}), ...]``."""
    out = []
    for title, names in PANELS:
        series: Series = {}
        for name in names:
            for label, key in (("train", name), ("eval", f"eval_{name}")):
                if label not in series:
                    steps, values = _series(history, key)
                    if values:
                        series[label] = (steps, values)
        if series:
            out.append((title, series))
    return out


def plot_log_history(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str | None = None
                     ) -> Path:
    """Draw the :func:`panels` of ``history`` side by side and save them as a PNG at ``path``.

    With nothing logged (a run shorter than ``logging_steps``) the image says so instead of failing.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # a Figure without pyplot keeps no global state between runs
    from matplotlib.ticker import MaxNLocator

    found = panels(history)
    fig = Figure(figsize=(4.0 * max(1, len(found)), 3.2), dpi=100, layout="constrained")
    if not found:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training metrics were logged\n(run longer than logging_steps)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for i, (name, series) in enumerate(found):
        ax = fig.add_subplot(1, len(found), i + 1)
        for label, (steps, values) in series.items():
            marker = "o" if len(values) < 20 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3,
                    linestyle="--" if label == "eval" else "-")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
