"""The data step of every workflow: read the source, hold out an evaluation set, convert to the needed kind.

With no ``dataset_name`` a workflow trains on the example file shipped inside the package
(:data:`DEMO_PAIRWISE`), converted to what the method takes: chosen answers for SFT, pairs for reward
models and DPO, thumbs-up/down rows for KTO, prompts for PPO.

>>> from hfrlhf.workflows.args import ScriptArguments
>>> train, held_out = load_splits(ScriptArguments(eval_fraction=0.25), kind="unpaired", seed=0)
>>> train.column_names, len(train), len(held_out)
(['prompt', 'completion', 'label'], 96, 32)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from datasets import Dataset

from hfrlhf.data.errors import DataError
from hfrlhf.data.formats import EXAMPLES_DIR, convert_kind, load, record_kind
from hfrlhf.workflows.args import ScriptArguments

__all__ = ["DEMO_PAIRWISE", "load_splits", "describe_source", "rows_named_in_source"]

logger = logging.getLogger(__name__)

DEMO_PAIRWISE = EXAMPLES_DIR / "demo_pairwise.jsonl"
"""The preference pairs shipped with hfrlhf: the default data of every workflow."""


def describe_source(script_args: ScriptArguments) -> str:
    """A short name for the training data (a file's name, or the Hub dataset id)."""
    source = script_args.dataset_name
    if source is None:
        return DEMO_PAIRWISE.name
    path = Path(source)
    return path.name if path.exists() else source


def load_splits(script_args: ScriptArguments, *, kind: str | Sequence[str] | None, seed: int = 42,
                drop_invalid: bool = False) -> tuple[Dataset, Dataset | None]:
    """Canonical records to train and evaluate on.

    Args:
        script_args: ``dataset_name`` (default: :data:`DEMO_PAIRWISE`), ``dataset_format``, the splits and
            ``eval_fraction``.
        kind: the canonical kind the trainer takes (``"pairwise"``, ``"unpaired"``, ...), or several (data of
            none of them is converted to the first: SFT takes ``("sft", "text")``), or None to keep what the data
            is (trainers that accept several kinds).
        seed: seed of the held-out split, so the same rows are held out on every run and every process.
        drop_invalid: drop invalid rows with a report instead of stopping at the first (the trainer config's
            ``drop_invalid_rows``).

    The held-out rows are chosen before any conversion, so e.g. the two halves of a pair never end up on
    both sides when pairs are turned into KTO rows.
    """
    source = script_args.dataset_name or str(DEMO_PAIRWISE)
    train = load(source, script_args.dataset_format, split=script_args.dataset_train_split, drop_invalid=drop_invalid)
    held_out = None
    if script_args.dataset_test_split:
        held_out = load(source, script_args.dataset_format, split=script_args.dataset_test_split,
                        drop_invalid=drop_invalid)
    elif script_args.eval_fraction > 0:
        if len(train) < 2:
            raise ValueError(f"{source}: {len(train)} row(s) cannot be split for evaluation; set eval_fraction=0")
        parts = train.train_test_split(test_size=script_args.eval_fraction, seed=seed, shuffle=True)
        train, held_out = parts["train"], parts["test"]
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        train = train if record_kind(train) in kinds else convert_kind(train, kinds[0])
        if held_out is not None and record_kind(held_out) not in kinds:
            held_out = convert_kind(held_out, kinds[0])
    logger.info("data: %d training rows%s from %s", len(train),
                f", {len(held_out)} held out" if held_out is not None else "", source)
    return train, held_out


@contextlib.contextmanager
def rows_named_in_source(script_args: ScriptArguments, splits: Mapping[str, Dataset | None]) -> Iterator[None]:
    """Make a trainer's data error name the row of the data source rather than of the records it was given.

    ``splits`` maps the trainer's names (``"train_dataset"``, ``"eval_dataset"``) to the records
    :func:`load_splits` gave it, which are shuffled by the held-out split and converted to the trainer's kind, so
    their row numbers are not the file's. An error about one of them (a prompt too long for ``max_length``) is
    pointed at the first row of the source with the same prompt. Sources with invalid rows are left as they are.
    """
    try:
        yield
    except DataError as err:
        records = splits.get(err.source or "")
        if err.row is not None and records is not None and 0 <= err.row < len(records):
            use_test = err.source == "eval_dataset" and script_args.dataset_test_split
            split = script_args.dataset_test_split if use_test else script_args.dataset_train_split
            source = script_args.dataset_name or str(DEMO_PAIRWISE)
            key = "prompt" if "prompt" in records.column_names else "text"  # language-modeling records: the text
            prompt = records[err.row][key]
            try:
                prompts = load(source, script_args.dataset_format, split=split)[key]
            except (DataError, KeyError):  # invalid rows were dropped, or another kind: rows cannot be matched
                raise err from None
            row = next((i for i, p in enumerate(prompts) if p == prompt), None)
            if row is not None:
                err.source, err.row = source, row
        raise
