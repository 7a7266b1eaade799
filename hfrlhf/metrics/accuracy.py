"""Accuracy as an ``evaluate`` metric module that works offline.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub. This module computes the same
number (the fraction of predictions equal to their reference, optionally weighted) and is loaded by path,
so evaluation needs no network:

>>> from hfrlhf.metrics import load_metric
>>> load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
{'accuracy': 0.75}

The file imports only ``evaluate`` and ``datasets``: ``evaluate.load`` copies it into its module cache and
imports it from there, outside the ``hfrlhf`` package.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate

_DESCRIPTION = """Fraction of predictions equal to their reference:
accuracy = sum_i w_i [prediction_i == reference_i] / sum_i w_i, with w_i = 1 unless sample_weight is given.
For a reward model, predictions are the index of the higher reward (0 = chosen) and references are 0."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) or, when False, the (weighted) count of correct ones.
    sample_weight (list of float): one weight per example; default all 1.
Returns:
    accuracy (float): in [0, 1] when normalize is True.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or weighted count) of predictions equal to their reference."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions: Sequence[int],
        references: Sequence[int],
        normalize: bool = True,
        sample_weight: Sequence[float] | None = None,
    ) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        weights = [1.0] * len(predictions) if sample_weight is None else [float(w) for w in sample_weight]
        if len(weights) != len(predictions):
            raise ValueError(f"{len(weights)} sample weights for {len(predictions)} predictions")
        correct = sum(w for p, r, w in zip(predictions, references, weights) if int(p) == int(r))
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else float("nan")}
