"""``evaluate`` metric modules kept inside the project, loaded by path so evaluation works offline.

>>> load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])
{'accuracy': 0.5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS_DIR", "available_metrics", "load_metric"]

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric modules shipped here (``load_metric`` accepts each)."""
    return sorted(p.stem for p in METRICS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of a metric module shipped with hfrlhf, by name (``"accuracy"``); no network.

    Keyword arguments go to ``evaluate.load`` (e.g. ``experiment_id`` when several processes evaluate at once).
    """
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no metric module {name!r}; shipped: {available_metrics()}")
    import evaluate

    return evaluate.load(str(path), **kwargs)
