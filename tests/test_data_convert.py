import logging

import pytest
from datasets import Dataset

from hfrlhf.data.convert import (
    listwise_to_pairs,
    pairs_to_listwise,
    pairs_to_sft,
    pointwise_to_listwise,
    pointwise_to_pairs,
    to_prompts,
    unpair,
)
from hfrlhf.data.errors import DataError
from hfrlhf.data.formats import EXAMPLES_DIR, load, record_kind


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def triples(ds):
    return [(r["chosen"], r["rejected"], r.get("margin")) for r in ds]


SYN = load(EXAMPLES_DIR / "listwise_scores.jsonl").select([1])  # Joyful 3, Sad 0, Glad 3, Content 2


def test_listwise_to_pairs_all_skips_ties():
    # i<j order: (0,1) (0,2)=tie (0,3) (1,2) (1,3) (2,3); the better one is chosen
    assert triples(listwise_to_pairs(SYN, margin=True)) == [
        ("Joyful", "Sad", 3.0),
        ("Joyful", "Content", 1.0),
        ("Glad", "Sad", 3.0),
        ("Content", "Sad", 2.0),
        ("Glad", "Content", 1.0),
    ]
    pairs = listwise_to_pairs(SYN)
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    assert set(pairs["prompt"]) == {"Give a one-word synonym for happy."}


def test_listwise_to_pairs_best_worst():
    assert triples(listwise_to_pairs(SYN, "best_worst", margin=True)) == [("Joyful", "Sad", 3.0)]
    ties = Dataset.from_dict({"prompt": ["p"], "responses": [["a", "b", "c"]], "scores": [[1.0, 1.0, 1.0]]})
    for mode in ("all", "best_worst"):
        empty = listwise_to_pairs(ties, mode, margin=True)
        assert empty.num_rows == 0 and empty.column_names == ["prompt", "chosen", "rejected", "margin"]
    with pytest.raises(ValueError, match="unknown mode 'top'; expected one of: all, best_worst"):
        listwise_to_pairs(SYN, "top")


def test_listwise_to_pairs_keeps_messages():
    ds = load(EXAMPLES_DIR / "listwise_ranks.jsonl")  # ranks 1, 3, 2 -> scores -1, -3, -2
    pairs = listwise_to_pairs(ds, margin=True)
    grind, tea, salt = (
        [a("Use slightly cooler water and a coarser grind.")],
        [a("Drink tea.")],
        [a("Add a pinch of salt or a splash of milk.")],
    )
    assert triples(pairs) == [(grind, tea, 2.0), (grind, salt, 1.0), (salt, tea, 1.0)]
    assert pairs.features["chosen"] == ds.features["responses"].feature
    assert record_kind(load(pairs)) == "pairwise"  # the output is valid canonical data


def test_pointwise_to_listwise_groups_by_prompt(caplog):
    with caplog.at_level(logging.WARNING, logger="hfrlhf.data.convert"):
        ds = pointwise_to_listwise(load(EXAMPLES_DIR / "pointwise.jsonl"))
    assert ds.to_list() == [
        {
            "prompt": "Rate this idea: a picnic in the park.",
            "responses": [
                " Lovely, bring a blanket and some fruit.",
                " Ants everywhere, terrible.",
                " Fine if it is sunny.",
            ],
            "scores": [0.9, 0.2, 0.6],
        }
    ]
    assert "left out 1 of 2 prompts that have fewer than 2 distinct completions" in caplog.text


def test_pointwise_to_listwise_messages_and_duplicates():
    ds = Dataset.from_list(
        [
            {"prompt": [u("q")], "completion": [a("x")], "score": 1.0},
            {"prompt": [u("r")], "completion": [a("x")], "score": 5.0},
            {"prompt": [u("q")], "completion": [a("y")], "score": 2.0},
            {"prompt": [u("q")], "completion": [a("x")], "score": 9.0},  # repeated: the first score stays
            {"prompt": [u("r")], "completion": [a("z")], "score": 4.0},
        ]
    )
    assert pointwise_to_listwise(ds).to_list() == [
        {"prompt": [u("q")], "responses": [[a("x")], [a("y")]], "scores": [1.0, 2.0]},
        {"prompt": [u("r")], "responses": [[a("x")], [a("z")]], "scores": [5.0, 4.0]},
    ]


def test_pointwise_to_pairs():
    ds = load(EXAMPLES_DIR / "pointwise.jsonl")  # Lovely 0.9, Ants 0.2, Fine 0.6 (+ a lone prompt)
    out = pointwise_to_pairs(ds, margin=True)
    assert [(c, r) for c, r, _ in triples(out)] == [
        (" Lovely, bring a blanket and some fruit.", " Ants everywhere, terrible."),
        (" Lovely, bring a blanket and some fruit.", " Fine if it is sunny."),
        (" Fine if it is sunny.", " Ants everywhere, terrible."),
    ]
    assert out["margin"] == pytest.approx([0.7, 0.3, 0.4])
    assert pointwise_to_pairs(ds, "best_worst")["rejected"] == [" Ants everywhere, terrible."]


def test_unpair_interleaves_and_drops_margin():
    ds = load(
        [
            {"prompt": [u("q")], "chosen": [a("yes")], "rejected": [a("no")], "margin": 1.5},
            {"prompt": [u("r")], "chosen": [a("ok")], "rejected": [a("bad")], "margin": 0.5},
        ]
    )
    out = unpair(ds)
    assert out.to_list() == [
        {"prompt": [u("q")], "completion": [a("yes")], "label": True},
        {"prompt": [u("q")], "completion": [a("no")], "label": False},
        {"prompt": [u("r")], "completion": [a("ok")], "label": True},
        {"prompt": [u("r")], "completion": [a("bad")], "label": False},
    ]
    assert out.features["label"].dtype == "bool"


def test_pairs_to_listwise_round_trips():
    ds = load(EXAMPLES_DIR / "pairwise_messages.jsonl")
    listwise = pairs_to_listwise(ds)
    assert listwise[0] == {
        "prompt": ds[0]["prompt"],
        "responses": [ds[0]["chosen"], ds[0]["rejected"]],
        "scores": [1.0, 0.0],
    }
    assert listwise_to_pairs(listwise).to_list() == ds.to_list()


def test_pairs_to_sft_and_to_prompts():
    ds = load(EXAMPLES_DIR / "hh_rlhf.jsonl")
    sft = pairs_to_sft(ds)
    assert sft.column_names == ["prompt", "completion"]
    assert sft["completion"] == ds["chosen"]
    rows = [{"prompt": [u("q")], "completion": [a("1")]}, {"prompt": [u("r")], "completion": [a("2")]},
            {"prompt": [u("q")], "completion": [a("3")]}]  # fmt: skip
    assert to_prompts(Dataset.from_list(rows)).to_list() == [{"prompt": [u("q")]}, {"prompt": [u("r")]}]


def test_helpers_name_the_missing_column():
    sft = Dataset.from_dict({"prompt": ["q"], "completion": ["a"]})
    with pytest.raises(
        DataError, match=r"field 'chosen': unpair expects columns \['prompt', 'chosen', 'rejected'\]"
    ):
        unpair(sft)
    with pytest.raises(DataError, match="field 'score'"):
        pointwise_to_pairs(sft)
