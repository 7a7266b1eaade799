"""Property tests over the whole data path: arbitrary rows, or arbitrary pre-tokenized records, either stop with
a data error that names the row and the field, or become batches that a model runs on with finite log-probs.
Nothing bad reaches a forward pass."""

import math

import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hfrlhf.data.collators import (
    ListwiseCollator,
    PairwiseCollator,
    PointwiseCollator,
    PromptCollator,
    SFTCollator,
    UnpairedCollator,
)
from hfrlhf.data.errors import DataError
from hfrlhf.data.formats import load, record_kind
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.trainers.base import HfrlhfConfig, prepare_dataset

TOK = build_tiny_tokenizer()
MODEL = build_tiny_llama(TOK, seed=0)
PAD = TOK.pad_token_id
COLLATORS = {
    "pairwise": lambda: PairwiseCollator(PAD), "listwise": lambda: ListwiseCollator(PAD),
    "unpaired": lambda: UnpairedCollator(PAD, kl_pairs=True), "pointwise": lambda: PointwiseCollator(PAD),
    "sft": lambda: SFTCollator(PAD), "prompt": lambda: PromptCollator(PAD),
}  # fmt: skip
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return HfrlhfConfig(output_dir=str(tmp_path_factory.mktemp("out")), report_to=[], max_length=24,
                        disable_tqdm=True)


def _assert_located(err: DataError, rows: list) -> None:
    """A row-level error names a row that exists and says so in its message; the field is one the row has."""
    text = str(err)
    assert text and err.message
    if err.row is not None:
        assert 0 <= err.row < len(rows) and f"row {err.row}" in text
        if err.field is not None and isinstance(rows[err.row], dict):
            assert f"field {err.field!r}" in text


def _run_model(batch: dict, kind: str) -> None:
    with torch.no_grad():
        if kind == "prompt":
            logits = MODEL(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.isfinite(logits).all()
            return
        out = batch_logprobs(MODEL, batch, chunk_size=7)
    assert out.token_logps.numel() > 0 and torch.isfinite(out.token_logps).all()
    assert torch.isfinite(out.seq_logps).all() and (out.seq_logps <= 0).all()
    assert (out.seq_lens > 0).all()


# --- arbitrary raw rows -----------------------------------------------------------------------------------------------
text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "Hi", "one two three " * 8, "\u00e9\u4e2d\U0001f600"]))
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": text}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), st.one_of(text, st.none(), st.integers()), max_size=3),
), max_size=3)  # fmt: skip
number = st.one_of(st.floats(), st.integers(-5, 5), st.booleans(), st.none(), text)
value = st.one_of(text, messages, number, st.lists(st.one_of(text, messages), max_size=3),
                  st.lists(number, max_size=3))
# rows built around a schema, so a good share of examples reach tokenization, collation and the model
schema = st.sampled_from([
    ("prompt", "chosen", "rejected"), ("prompt", "chosen", "rejected", "margin"), ("prompt", "responses", "scores"),
    ("prompt", "responses", "ranks"), ("prompt", "completion", "label"), ("prompt", "completion", "score"),
    ("prompt", "completion"), ("prompt",), ("chosen", "rejected"), ("messages",),
])  # fmt: skip


good_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12).filter(
    str.strip)
finite = st.floats(-5, 5, allow_nan=False)


def _good(draw, field, chat, k):
    """A valid value of ``field`` (``k`` = number of responses of a listwise row)."""
    if field in ("prompt", "chosen", "rejected", "completion"):
        if not chat:
            return draw(good_text)
        role = "user" if field == "prompt" else "assistant"
        return [{"role": role, "content": draw(good_text)}]
    if field == "responses":  # distinct by construction
        if chat:
            return [[{"role": "assistant", "content": draw(good_text) + f" {i}"}] for i in range(k)]
        return [draw(good_text) + f" {i}" for i in range(k)]
    if field == "scores":
        return [draw(finite) for _ in range(k)]
    if field == "ranks":
        return draw(st.permutations(list(range(1, k + 1))))
    if field == "label":
        return draw(st.booleans())
    if field == "messages":
        return [{"role": "user", "content": draw(good_text)}, {"role": "assistant", "content": draw(good_text)}]
    return draw(finite)  # margin, score


@st.composite
def rows(draw):
    """Rows of one schema, valid by construction, then (often) one value of one row replaced by anything."""
    fields = draw(schema)
    chat = draw(st.booleans())
    out = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(2, 4))
        row = {f: _good(draw, f, chat, k) for f in fields}
        if "chosen" in row and row["chosen"] == row["rejected"]:
            row["rejected"] = row["rejected"] + " no" if not chat else [{"role": "assistant", "content": "no no"}]
        out.append(row)
    if draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 1))
        out[i][draw(st.sampled_from(fields))] = draw(value)
    return out


@SETTINGS
@given(data=rows(), drop=st.booleans())
def test_arbitrary_rows_give_a_located_error_or_batches_the_model_runs_on(args, data, drop):
    args.drop_invalid_rows = drop
    try:
        records = load(data, drop_invalid=drop)
        kind = record_kind(records)
        tokenized = prepare_dataset(records, TOK, args, kinds=(kind,))
    except DataError as err:
        _assert_located(err, data)
        return
    except ValueError as err:  # dataset-level: nothing left to train on (or every listwise row's scores tie)
        assert "empty" in str(err) or "nothing to learn from" in str(err)
        return
    assert len(tokenized) >= 1
    features = tokenized.to_list()
    _run_model(COLLATORS[kind]()(features), kind)
    event(f"reached the model: {kind}")


# --- arbitrary pre-tokenized records ------------------------------------------------------------------------------------
ids = st.lists(st.integers(-3, len(TOK) + 3), max_size=6)


@st.composite
def tokenized_rows(draw):
    kind = draw(st.sampled_from(["pairwise", "listwise", "unpaired"]))
    mostly_valid = st.lists(st.integers(0, len(TOK) - 1), min_size=1, max_size=6)
    pick = st.one_of(mostly_valid, mostly_valid, ids)
    out = []
    for _ in range(draw(st.integers(1, 3))):
        row = {"prompt_ids": draw(pick)}
        if kind == "pairwise":
            row.update(chosen_ids=draw(pick), rejected_ids=draw(pick))
        elif kind == "listwise":
            k = draw(st.integers(1, 3))
            row.update(responses_ids=[draw(pick) for _ in range(k)], scores=[float(i) for i in range(k)])
        else:
            row.update(completion_ids=draw(pick), label=draw(st.booleans()))
        out.append(row)
    return kind, out


@SETTINGS
@given(case=tokenized_rows())
def test_pretokenized_records_are_checked_before_any_forward(args, case):
    kind, data = case
    args.drop_invalid_rows = False
    try:
        dataset = prepare_dataset(Dataset.from_list(data), TOK, args, kinds=(kind,))
    except DataError as err:
        _assert_located(err, data)
        assert err.row is not None and err.field in data[err.row]
        bad = data[err.row][err.field]
        seqs = bad if err.field == "responses_ids" else [bad]
        assert (len(seqs) < 2 if err.field == "responses_ids" else False) or any(
            not s or min(s) < 0 or max(s) >= len(TOK) for s in seqs)
        return
    # no error: every id is in range and every sequence non-empty, and the batch runs
    for row in data:
        for key, value in row.items():
            if key.endswith("_ids"):
                for s in (value if key == "responses_ids" else [value]):
                    assert s and 0 <= min(s) and max(s) < len(TOK)
    _run_model(COLLATORS[kind]()(dataset.to_list()), kind)


def test_nonfinite_numbers_never_reach_a_batch():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(DataError, match=r"row 0, field 'margin'"):
            load([{"prompt": "Hi", "chosen": " a", "rejected": " b", "margin": bad}])
        with pytest.raises(DataError, match=r"row 1, field 'score'"):
            load([{"prompt": "Hi", "completion": " a", "score": 1.0}, {"prompt": "Hi", "completion": " a", "score": bad}])
