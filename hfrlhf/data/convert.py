"""Turn canonical records of one kind into another: scores into pairs, pairs into labels.

Every function takes a ``datasets.Dataset`` of canonical records (as :func:`hfrlhf.data.formats.load`
returns them) and returns a new one; prompts and completions keep their form (text or messages).

>>> from datasets import Dataset
>>> ds = Dataset.from_dict({"prompt": ["Q"], "responses": [["a", "b", "c"]], "scores": [[1.0, 3.0, 1.0]]})
>>> listwise_to_pairs(ds).to_list()
[{'prompt': 'Q', 'chosen': 'b', 'rejected': 'a'}, {'prompt': 'Q', 'chosen': 'b', 'rejected': 'c'}]
>>> unpair(Dataset.from_dict({"prompt": ["Q"], "chosen": ["yes"], "rejected": ["no"]})).to_list()
[{'prompt': 'Q', 'completion': 'yes', 'label': True}, {'prompt': 'Q', 'completion': 'no', 'label': False}]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from datasets import Dataset, DatasetInfo, Features, List, Value
from datasets.table import InMemoryTable

from hfrlhf.data.errors import DataError

logger = logging.getLogger(__name__)

PAIR_MODES = ("all", "best_worst")


def dataset_from_columns(columns: dict[str, list[Any]], features: Features) -> Dataset:
    """A Dataset from Python columns with exactly ``features``, built straight through Arrow.

    ``Dataset.from_dict(columns, features=...)`` encodes every example in Python first, about 15x slower
    on message lists; the values here are already clean canonical values.

    >>> features = Features({"prompt": Value("string"), "score": Value("float64")})
    >>> dataset_from_columns({"prompt": ["a"], "score": [1]}, features)[0]
    {'prompt': 'a', 'score': 1.0}
    """
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


def _rows(ds: Dataset, columns: Sequence[str], what: str) -> list[dict[str, Any]]:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{what} expects columns {list(columns)}, got {ds.column_names}; load the data with "
            "hfrlhf.data.load(...) first",
            field=missing[0],
            reason="missing column",
        )
    return ds.select_columns(list(columns)).to_list()


def _key(value: Any) -> Any:
    """A hashable key for a prompt or completion (text, or a list of messages)."""
    if isinstance(value, str):
        return value
    return tuple((m["role"], m["content"]) for m in value)


def _pairs(scores: Sequence[float], mode: str) -> list[tuple[int, int]]:
    """(better, worse) index pairs of one prompt's responses; ties never make a pair.

    ``"all"`` is every pair with different scores (InstructGPT's K-choose-2 comparisons), in the order
    (0, 1), (0, 2), ..., (1, 2), ...; ``"best_worst"`` is the single pair of the first highest and first
    lowest score.

    >>> _pairs([1.0, 3.0, 2.0], "all")
    [(1, 0), (2, 0), (1, 2)]
    >>> _pairs([1.0, 3.0, 2.0, 1.0], "best_worst")
    [(1, 0)]
    """
    if mode == "best_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        return [(best, worst)] if scores[best] > scores[worst] else []
    out = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] != scores[j]:
                out.append((i, j) if scores[i] > scores[j] else (j, i))
    return out


def _check_mode(mode: str) -> None:
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(PAIR_MODES)}")


def listwise_to_pairs(ds: Dataset, mode: str = "all", *, margin: bool = False) -> Dataset:
    """Listwise records (``prompt``, ``responses``, ``scores``) -> pairwise records.

    Args:
        ds: listwise records.
        mode: ``"all"`` for every pair of responses with different scores (K responses give up to
            K(K-1)/2 pairs, as InstructGPT trains its reward model), or ``"best_worst"`` for one pair per
            prompt: highest against lowest score.
        margin: add a ``margin`` column, the score difference (chosen - rejected, > 0).

    Responses with equal scores never form a pair, so a prompt whose scores are all equal gives no rows.

    >>> ds = Dataset.from_dict({"prompt": ["Q"], "responses": [["a", "b", "c"]], "scores": [[0.0, 2.0, 0.5]]})
    >>> [(r["chosen"], r["rejected"], r["margin"]) for r in listwise_to_pairs(ds, margin=True)]
    [('b', 'a', 2.0), ('c', 'a', 0.5), ('b', 'c', 1.5)]
    >>> listwise_to_pairs(ds, "best_worst").to_list()
    [{'prompt': 'Q', 'chosen': 'b', 'rejected': 'a'}]
    """
    _check_mode(mode)
    columns: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": [], "margin": []}
    for row in _rows(ds, ("prompt", "responses", "scores"), "listwise_to_pairs"):
        responses, scores = row["responses"], row["scores"]
        for better, worse in _pairs(scores, mode):
            columns["prompt"].append(row["prompt"])
            columns["chosen"].append(responses[better])
            columns["rejected"].append(responses[worse])
            columns["margin"].append(float(scores[better] - scores[worse]))
    completion = ds.features["responses"].feature
    features = {"prompt": ds.features["prompt"], "chosen": completion, "rejected": completion}
    if margin:
        features["margin"] = Value("float64")
    else:
        del columns["margin"]
    return dataset_from_columns(columns, Features(features))


def pointwise_to_listwise(ds: Dataset) -> Dataset:
    """Pointwise records (``prompt``, ``completion``, ``score``) -> one listwise record per distinct prompt.

    Rows are grouped by prompt in order of first appearance, completions keep their row order. A repeated
    (prompt, completion) keeps its first score. Prompts with fewer than 2 distinct completions cannot be
    ranked and are left out (with a logged warning saying how many).

    >>> ds = Dataset.from_dict({"prompt": ["Q", "R", "Q"], "completion": ["a", "x", "b"], "score": [1.0, 5.0, 2.0]})
    >>> pointwise_to_listwise(ds).to_list()
    [{'prompt': 'Q', 'responses': ['a', 'b'], 'scores': [1.0, 2.0]}]
    """
    groups: dict[Any, dict[str, Any]] = {}
    for row in _rows(ds, ("prompt", "completion", "score"), "pointwise_to_listwise"):
        group = groups.setdefault(_key(row["prompt"]), {"prompt": row["prompt"], "responses": {}})
        group["responses"].setdefault(_key(row["completion"]), (row["completion"], float(row["score"])))
    kept = [g for g in groups.values() if len(g["responses"]) >= 2]
    if len(kept) < len(groups):
        logger.warning(
            "pointwise_to_listwise: left out %d of %d prompts that have fewer than 2 distinct completions",
            len(groups) - len(kept),
            len(groups),
        )
    columns = {
        "prompt": [g["prompt"] for g in kept],
        "responses": [[c for c, _ in g["responses"].values()] for g in kept],
        "scores": [[s for _, s in g["responses"].values()] for g in kept],
    }
    features = Features(
        {
            "prompt": ds.features["prompt"],
            "responses": List(ds.features["completion"]),
            "scores": List(Value("float64")),
        }
    )
    return dataset_from_columns(columns, features)


def pointwise_to_pairs(ds: Dataset, mode: str = "all", *, margin: bool = False) -> Dataset:
    """Pointwise records -> pairwise records, comparing completions of the same prompt.

    Same as ``listwise_to_pairs(pointwise_to_listwise(ds), mode, margin=margin)``.

    >>> ds = Dataset.from_dict({"prompt": ["Q", "Q", "Q"], "completion": ["a", "b", "c"], "score": [1.0, 2.0, 1.0]})
    >>> [(r["chosen"], r["rejected"]) for r in pointwise_to_pairs(ds)]
    [('b', 'a'), ('b', 'c')]
    """
    _check_mode(mode)
    return listwise_to_pairs(pointwise_to_listwise(ds), mode, margin=margin)


def pairs_to_listwise(ds: Dataset) -> Dataset:
    """Pairwise records -> listwise records with K = 2: ``responses = [chosen, rejected]``, ``scores = [1, 0]``.

    Each pair stays its own row (pairs of one prompt are not merged: pairwise preferences need not be
    consistent with any ranking). ``listwise_to_pairs`` turns the result back into the same pairs.

    >>> pairs_to_listwise(Dataset.from_dict({"prompt": ["Q"], "chosen": ["yes"], "rejected": ["no"]})).to_list()
    [{'prompt': 'Q', 'responses': ['yes', 'no'], 'scores': [1.0, 0.0]}]
    """
    rows = _rows(ds, ("prompt", "chosen", "rejected"), "pairs_to_listwise")
    columns = {
        "prompt": [r["prompt"] for r in rows],
        "responses": [[r["chosen"], r["rejected"]] for r in rows],
        "scores": [[1.0, 0.0] for _ in rows],
    }
    features = Features(
        {
            "prompt": ds.features["prompt"],
            "responses": List(ds.features["chosen"]),
            "scores": List(Value("float64")),
        }
    )
    return dataset_from_columns(columns, features)


def unpair(ds: Dataset) -> Dataset:
    """Pairwise records -> unpaired records: chosen with ``label=True``, rejected with ``label=False``.

    Row i gives rows 2i (chosen) and 2i+1 (rejected), so any slice holds as many desirable as undesirable
    completions. ``margin`` is dropped. This is how KTO trains on preference data.

    >>> ds = Dataset.from_dict({"prompt": ["Q", "R"], "chosen": ["yes", "ok"], "rejected": ["no", "bad"]})
    >>> [(r["prompt"], r["completion"], r["label"]) for r in unpair(ds)]
    [('Q', 'yes', True), ('Q', 'no', False), ('R', 'ok', True), ('R', 'bad', False)]
    """
    rows = _rows(ds, ("prompt", "chosen", "rejected"), "unpair")
    columns: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
    for r in rows:
        columns["prompt"] += [r["prompt"], r["prompt"]]
        columns["completion"] += [r["chosen"], r["rejected"]]
        columns["label"] += [True, False]
    features = Features(
        {"prompt": ds.features["prompt"], "completion": ds.features["chosen"], "label": Value("bool")}
    )
    return dataset_from_columns(columns, features)


def pairs_to_sft(ds: Dataset) -> Dataset:
    """Pairwise records -> SFT records on the chosen completions (``prompt``, ``completion = chosen``).

    >>> pairs_to_sft(Dataset.from_dict({"prompt": ["Q"], "chosen": ["yes"], "rejected": ["no"]})).to_list()
    [{'prompt': 'Q', 'completion': 'yes'}]
    """
    rows = _rows(ds, ("prompt", "chosen"), "pairs_to_sft")
    columns = {"prompt": [r["prompt"] for r in rows], "completion": [r["chosen"] for r in rows]}
    return dataset_from_columns(
        columns, features=Features({"prompt": ds.features["prompt"], "completion": ds.features["chosen"]})
    )


def to_prompts(ds: Dataset) -> Dataset:
    """Records of any kind -> prompt-only records, each distinct prompt once, in order of first appearance.

    >>> list(to_prompts(Dataset.from_dict({"prompt": ["Q", "R", "Q"], "completion": ["a", "b", "c"]}))["prompt"])
    ['Q', 'R']
    """
    seen: dict[Any, Any] = {}
    for r in _rows(ds, ("prompt",), "to_prompts"):
        seen.setdefault(_key(r["prompt"]), r["prompt"])
    return dataset_from_columns(
        {"prompt": list(seen.values())}, features=Features({"prompt": ds.features["prompt"]})
    )
