import json
import logging
import math
import pickle

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrlhf.data.errors import DataError
from hfrlhf.data.formats import (
    EXAMPLES_DIR,
    FORMATS,
    KINDS,
    convert_kind,
    detect_format,
    load,
    record_kind,
    validate,
)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def read_rows(name):
    with open(EXAMPLES_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# example file -> (detected format, canonical kind, the exact canonical records), written out by hand
EXPECTED = {
    "pairwise_text.jsonl": ("pairwise", "pairwise", [
        {"prompt": "The best thing about a rainy Sunday is",
         "chosen": " curling up with a good book and a pot of tea.", "rejected": " nothing, it ruins everything."},
        {"prompt": "Describe a sunflower in one sentence.",
         "chosen": " A tall, bright flower that turns its face to follow the sun.", "rejected": " A weed."},
        {"prompt": "Is a short walk after dinner worth it?",
         "chosen": " Yes, it helps digestion and clears the head.", "rejected": " No, just go to bed."},
    ]),
    "pairwise_messages.jsonl": ("pairwise", "pairwise", [
        {"prompt": [u("What should I cook tonight?")],
         "chosen": [a("How about a quick vegetable stir-fry with rice? It takes twenty minutes.")],
         "rejected": [a("Cook whatever, I don't care.")]},
        {"prompt": [{"role": "system", "content": "You are a friendly gardening helper."},
                    u("My tomatoes have yellow leaves.")],
         "chosen": [a("That is often overwatering or a lack of nitrogen; let the soil dry a little and add some compost.")],
         "rejected": [a("Throw them out.")]},
        {"prompt": [u("Name a calm colour."), a("Light blue."), u("And a warm one?")],
         "chosen": [a("Terracotta orange.")], "rejected": [a("Light blue again.")]},
    ]),
    "pairwise_implicit_text.jsonl": ("pairwise_implicit", "pairwise", [
        {"prompt": "Q: What is the capital of France?\nA:", "chosen": " Paris.", "rejected": " Lyon."},
        {"prompt": "My favourite season is", "chosen": " autumn because of the colours.",
         "rejected": " none of them."},
    ]),
    "pairwise_implicit_messages.jsonl": ("pairwise_implicit", "pairwise", [
        {"prompt": [u("What color is the sky?")], "chosen": [a("It is blue on a clear day.")],
         "rejected": [a("It is green.")]},
        {"prompt": [u("Hi!"), a("Hello! How can I help?"), u("Tell me a fun fact.")],
         "chosen": [a("Octopuses have three hearts.")], "rejected": [a("No.")]},
    ]),
    "hh_rlhf.jsonl": ("hh_rlhf", "pairwise", [
        {"prompt": [u("What is a good way to keep basil alive indoors?")],
         "chosen": [a("Give it a sunny windowsill, water it when the top of the soil feels dry, and pinch off the "
                      "flower buds so it keeps making leaves.")],
         "rejected": [a("Basil always dies indoors, buy it fresh instead.")]},
        {"prompt": [u("Can you recommend a board game for two?"),
                    a("Sure! Do you like quick games or longer strategy ones?"), u("Quick ones, please.")],
         "chosen": [a("Try Patchwork: it takes about twenty minutes and is easy to learn.")],
         "rejected": [a("Board games are boring.")]},
        {"prompt": [u("How long should I boil an egg?")],
         "chosen": [a("About seven minutes for a jammy yolk, ten for hard-boiled.")], "rejected": [a("An hour.")]},
    ]),
    "hh_rlhf_cn.jsonl": ("hh_rlhf_cn", "pairwise", [
        {"prompt": [u("推荐一本适合周末读的书。")], "chosen": [a("可以读《小王子》，篇幅短，故事温暖。")],
         "rejected": [a("周末不要读书。")]},
        {"prompt": [u("你好"), a("你好！有什么可以帮你？"), u("今天适合跑步吗？")],
         "chosen": [a("如果天气晴朗、气温适中，很适合慢跑半小时。")], "rejected": [a("不知道。")]},
    ]),
    "listwise_scores.jsonl": ("listwise", "listwise", [
        {"prompt": "Suggest a name for a grey kitten.", "responses": ["Pebble", "Cat", "Smokey"],
         "scores": [0.7, 0.1, 0.9]},
        {"prompt": "Give a one-word synonym for happy.", "responses": ["Joyful", "Sad", "Glad", "Content"],
         "scores": [3.0, 0.0, 3.0, 2.0]},
    ]),
    "listwise_ranks.jsonl": ("listwise", "listwise", [
        {"prompt": [u("How do I make my coffee less bitter?")],
         "responses": [[a("Use slightly cooler water and a coarser grind.")], [a("Drink tea.")],
                       [a("Add a pinch of salt or a splash of milk.")]],
         "scores": [-1.0, -3.0, -2.0]},
    ]),
    "unpaired.jsonl": ("unpaired", "unpaired", [
        {"prompt": "Write a greeting for a birthday card.",
         "completion": " Wishing you a year full of laughter and good friends!", "label": True},
        {"prompt": "Write a greeting for a birthday card.", "completion": " Another year older, whatever.",
         "label": False},
        {"prompt": "Say something about the ocean.", "completion": " Its waves are soothing to listen to.",
         "label": True},
    ]),
    "pointwise.jsonl": ("pointwise", "pointwise", [
        {"prompt": "Rate this idea: a picnic in the park.", "completion": " Lovely, bring a blanket and some fruit.",
         "score": 0.9},
        {"prompt": "Rate this idea: a picnic in the park.", "completion": " Ants everywhere, terrible.", "score": 0.2},
        {"prompt": "Rate this idea: a picnic in the park.", "completion": " Fine if it is sunny.", "score": 0.6},
        {"prompt": "Describe fresh bread.", "completion": " Warm, crusty and fragrant.", "score": 0.8},
    ]),
    "sft.jsonl": ("sft", "sft", [
        {"prompt": "Translate to French: good morning", "completion": " bonjour"},
        {"prompt": "Give me a tip for better sleep.",
         "completion": " Keep the same bedtime every night, even at weekends."},
    ]),
    "messages.jsonl": ("messages", "sft", [
        {"prompt": [u("What is 3 times 4?")], "completion": [a("12.")]},
        {"prompt": [{"role": "system", "content": "Answer briefly."}, u("Hi"), a("Hello!"), u("Is tea healthy?")],
         "completion": [a("In moderation, yes.")]},
    ]),
    "prompt.jsonl": ("prompt", "prompt", [
        {"prompt": [u("Write a short review of your favourite cafe.")]},
        {"prompt": [u("What do you think of spring mornings?")]},
    ]),
    "text.jsonl": ("text", "text", [
        {"text": "The kettle clicked off, and the kitchen filled with the smell of fresh coffee."},
        {"text": "Water boils at 100 degrees Celsius at sea level."},
    ]),
    "chatllama_actor.jsonl": ("chatllama_actor", "sft", [
        {"prompt": "Explain what a rainbow is.",
         "completion": "Sunlight split into its colours by raindrops acting like tiny prisms."},
        {"prompt": "Give a tip for learning a language.", "completion": "Practise a little every day, out loud."},
    ]),
    "chatllama_reward.jsonl": ("chatllama_reward", "pointwise", [
        {"prompt": "Explain what a rainbow is.",
         "completion": "Sunlight split into its colours by raindrops acting like tiny prisms.", "score": 4.5},
        {"prompt": "Explain what a rainbow is.", "completion": "A colourful arc.", "score": 2.0},
    ]),
    "chatllama_prompt.jsonl": ("chatllama_prompt", "prompt", [
        {"prompt": "Explain what a rainbow is."},
        {"prompt": "Give a tip for learning a language."},
    ]),
}  # fmt: skip

CONTAINERS = ["list", "dataset", "datasetdict", "jsonl", "json_array", "json_object", "parquet"]


def as_source(rows, container, tmp_path):
    """The same rows in each kind of source load() takes."""
    if container == "list":
        return rows
    if container == "dataset":
        return Dataset.from_list(rows)
    if container == "datasetdict":
        return DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])})
    if container == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    if container == "json_array":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return str(path)
    if container == "json_object":
        path = tmp_path / "data.json"
        path.write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
        return str(path)
    if container == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)
    raise AssertionError(container)


def test_every_schema_has_an_example_file():
    assert {fmt for fmt, _, _ in EXPECTED.values()} == set(FORMATS)
    assert sorted(p.name for p in EXAMPLES_DIR.glob("*.jsonl")) == sorted([*EXPECTED, "demo_pairwise.jsonl"])


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_schema_loads_from_every_container(name, container, tmp_path):
    fmt, kind, expected = EXPECTED[name]
    rows = read_rows(name)
    assert detect_format(rows) == fmt
    ds = load(as_source(rows, container, tmp_path))
    assert isinstance(ds, Dataset)
    assert record_kind(ds) == kind
    assert ds.column_names == list(KINDS[kind])
    assert ds.to_list() == expected


def test_types_of_canonical_columns():
    ds = load(EXAMPLES_DIR / "listwise_scores.jsonl")
    assert str(ds.features["scores"]) == "List(Value('float64'))"
    assert load(EXAMPLES_DIR / "unpaired.jsonl").features["label"].dtype == "bool"
    msgs = load(EXAMPLES_DIR / "pairwise_messages.jsonl").features["chosen"]
    assert str(msgs) == "List({'role': Value('string'), 'content': Value('string')})"
    # integer scores become floats
    assert load([{"prompt": "p", "completion": "c", "score": 3}])[0]["score"] == 3.0


def test_demo_file_is_64_varied_conversational_pairs():
    ds = load(EXAMPLES_DIR / "demo_pairwise.jsonl")
    assert ds.num_rows == 64 and record_kind(ds) == "pairwise"
    rows = ds.to_list()
    assert len({r["prompt"][0]["content"] for r in rows}) == 64
    assert all([m["role"] for m in r["prompt"]] == ["user"] for r in rows)
    assert all(len(r["chosen"]) == len(r["rejected"]) == 1 for r in rows)
    assert rows[0]["prompt"] == [u("What do you think of a morning cup of coffee?")]


# ----------------------------------------------------------------------------------------------------- sources


def test_jsonl_row_and_line_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "p", "completion": "c"}\n\n'
        '{"prompt": "p", "completion": "d"}\n'
        '{"prompt": "p", "completion": null}\n'
    )
    with pytest.raises(DataError) as info:
        load(path)
    err = info.value
    assert (err.source, err.row, err.line, err.field) == (str(path), 2, 4, "completion")
    assert (
        str(err)
        == f"{path}: row 2 (line 4), field 'completion': expected non-empty text or list of messages, got None"
    )


def test_broken_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"row 1 \(line 2\): invalid JSON: Expecting property name") as info:
        load(path)
    assert info.value.field is None
    assert load(path, drop_invalid=True)["prompt"] == ["a", "c"]


def test_invalid_utf8_and_lone_surrogate_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n{"prompt": "\\ud800"}\n')
    report = validate(path)
    assert report.kept == 1
    assert report.dropped == {"invalid JSON": 1, "prompt: invalid unicode": 1}


def test_json_file_variants(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    by_split = tmp_path / "splits.json"
    by_split.write_text(json.dumps({"train": rows, "test": [{"prompt": "t"}]}))
    assert load(by_split)["prompt"] == ["a", "b"]
    assert load(by_split, split="test")["prompt"] == ["t"]
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name, as datasets accepts
    lines.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load(lines)["prompt"] == ["a", "b"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DataError, match=r"bad.json: line 2: invalid JSON: Expecting value"):
        load(bad)
    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"a": rows, "b": rows}))
    with pytest.raises(DataError, match=r"an object with keys \['a', 'b'\]"):
        load(two_lists)
    train_only = tmp_path / "train_only.json"
    train_only.write_text(json.dumps({"train": rows}))
    assert load(train_only)["prompt"] == ["a", "b"]
    with pytest.raises(DataError, match=r"split 'test' not found; the JSON object has lists \['train'\]"):
        load(train_only, split="test")
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(DataError, match="expected a JSON array of rows, got int 3"):
        load(scalar)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".json-lines"])
def test_a_file_of_one_set_of_rows_has_no_test_split(tmp_path, suffix):
    """An evaluation split asked of a file that holds only training rows is an error, not the training rows."""
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    path = tmp_path / f"rows{suffix.split('-')[0]}"
    if suffix == ".parquet":
        Dataset.from_list(rows).to_parquet(path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load(path)["prompt"] == ["a", "b"]
    with pytest.raises(DataError, match=r"split 'test' not found: this file holds one set of rows"):
        load(path, split="test")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "missing.parquet"))
    csv = tmp_path / "data.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match=r"unsupported file type '.csv'"):
        load(csv)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read Parquet file"):
        load(broken)
    with pytest.raises(TypeError, match="got int"):
        load(3)


def test_datasetdict_split_and_missing_split():
    dd = DatasetDict(
        {"train": Dataset.from_list([{"prompt": "a"}]), "test": Dataset.from_list([{"prompt": "b"}])}
    )
    assert load(dd, split="test")["prompt"] == ["b"]
    with pytest.raises(DataError, match=r"split 'valid' not found; the DatasetDict has \['test', 'train'\]"):
        load(dd, split="valid")


def test_saved_dataset_folder(tmp_path):
    Dataset.from_list([{"prompt": "a", "completion": "b"}]).save_to_disk(tmp_path / "saved")
    assert load(tmp_path / "saved").to_list() == [{"prompt": "a", "completion": "b"}]


def test_hub_names_go_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return Dataset.from_list([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load("someone/prefs", split="test")
    assert calls == [("someone/prefs", "test")]
    assert ds.to_list() == [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]


# ------------------------------------------------------------------------------------------ detection, format=


@pytest.mark.parametrize(
    "columns, expected",
    [
        ({"prompt", "chosen", "rejected", "margin"}, "pairwise"),
        ({"prompt", "responses", "ranks"}, "listwise"),
        ({"prompt", "completion", "label", "score"}, "unpaired"),  # label wins over score
        ({"prompt", "completion", "score"}, "pointwise"),
        ({"prompt", "completion"}, "sft"),
        ({"messages", "id"}, "messages"),
        ({"user_input", "completion", "score"}, "chatllama_reward"),
        ({"context", "chosen", "rejected"}, "hh_rlhf_cn"),
        ({"chosen", "rejected"}, "pairwise_implicit"),
    ],
)
def test_detection_by_columns(columns, expected):
    assert detect_format([{c: "x" for c in columns}]) == expected


def test_detection_uses_columns_of_all_rows_and_the_hh_marker():
    # the first row lacks 'rejected', the second has it: still pairwise (and row 0 is then invalid)
    rows = [{"prompt": "p", "chosen": "c"}, {"prompt": "p", "chosen": "c", "rejected": "r"}]
    assert detect_format(rows) == "pairwise"
    assert detect_format(
        Dataset.from_dict({"prompt": ["p", "p"], "chosen": ["c", "c"], "rejected": [None, "r"]})
    ) == ("pairwise")
    hh = [{"chosen": None, "rejected": "x"}, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}]
    assert detect_format(hh) == "hh_rlhf"
    assert detect_format([{"chosen": "Human: a Assistant: b", "rejected": "x"}]) == "pairwise_implicit"


def test_detection_failures():
    with pytest.raises(
        DataError, match=r"cannot tell the schema from the columns \['foo'\]; known schemas: hh_rlhf_cn"
    ):
        detect_format([{"foo": 1}])
    with pytest.raises(DataError, match="expected at least one row, got none"):
        load([])
    with pytest.raises(DataError, match="expected at least one row"):
        load([], format="prompt")


def test_forced_format():
    rows = [{"prompt": "p", "completion": "c", "label": True}]
    assert load(rows, format="sft").to_list() == [{"prompt": "p", "completion": "c"}]
    assert load(rows, format="prompt").to_list() == [{"prompt": "p"}]
    # implicit-prompt splitting even though a prompt column exists
    pairs = [{"prompt": "ignored", "chosen": "It is red.", "rejected": "It is blue."}]
    assert load(pairs, format="pairwise_implicit").to_list() == [
        {"prompt": "It is", "chosen": " red.", "rejected": " blue."}
    ]
    with pytest.raises(DataError, match=r"row 0, field 'chosen': expected an hh-rlhf transcript"):
        load(pairs, format="hh_rlhf")
    with pytest.raises(
        DataError, match=r"row 0, field 'chosen': expected .*got nothing \(the column is missing\)"
    ):
        load([{"prompt": "p"}], format="pairwise")


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load([{"prompt": "p"}], format="dpo")
    assert not isinstance(info.value, DataError)
    assert str(info.value) == "unknown format 'dpo'; expected 'auto' or one of: " + ", ".join(FORMATS)


def test_ignored_known_columns_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="hfrlhf.data.formats"):
        assert load([{"prompt": "p", "chosen": "c"}]).column_names == ["prompt"]
    assert "read as 'prompt'; ignoring columns ['chosen']" in caplog.text


def test_extra_columns_and_message_keys_are_dropped():
    rows = [{"id": 7, "prompt": [{"role": "user", "content": "hi", "name": "bob"}], "completion": [a("yo")]}]
    assert load(rows).to_list() == [{"prompt": [u("hi")], "completion": [a("yo")]}]


# ------------------------------------------------------------------------------------------- schema details


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
        ("I like cats", "I like cars", ("I like", " cats", " cars")),  # never split mid-word
        ("The sky is blue", "The sky is blue and green", ("The sky is", " blue", " blue and green")),
        ("Q: 2+2?\nA: 4", "Q: 2+2?\nA: 5", ("Q: 2+2?\nA:", " 4", " 5")),
        ("Hello there.  Bye", "Hello there.  Hi", ("Hello there.", "  Bye", "  Hi")),
    ],
)
def test_implicit_prompt_text(chosen, rejected, expected):
    record = load([{"chosen": chosen, "rejected": rejected}])[0]
    assert (record["prompt"], record["chosen"], record["rejected"]) == expected


def test_implicit_prompt_text_without_shared_start():
    with pytest.raises(
        DataError, match=r"row 0, field 'chosen': expected 'chosen' and 'rejected' to start with"
    ):
        load([{"chosen": "Yes please", "rejected": "No thanks"}])
    with pytest.raises(DataError) as info:  # a common start, but no word boundary in it
        load([{"chosen": "Great!", "rejected": "Great?"}])
    assert (info.value.field, info.value.reason) == ("chosen", "no shared prompt")


def test_implicit_prompt_messages():
    # diverging at the first assistant turn: the later turns belong to the completions (as in TRL)
    chosen = [u("Hi"), a("Hello!"), u("Joke?"), a("Knock knock.")]
    rejected = [u("Hi"), a("Go away."), u("Joke?"), a("No.")]
    assert load([{"chosen": chosen, "rejected": rejected}]).to_list() == [
        {"prompt": [u("Hi")], "chosen": chosen[1:], "rejected": rejected[1:]}
    ]
    with pytest.raises(DataError, match="found no shared beginning"):
        load([{"chosen": [u("A"), a("b")], "rejected": [u("B"), a("b")]}])
    with pytest.raises(DataError) as info:  # nothing left for 'chosen' once the shared messages are the prompt
        load([{"chosen": [u("A"), a("b")], "rejected": [u("A"), a("b"), u("more"), a("c")]}])
    assert (info.value.field, info.value.reason) == ("chosen", "no completion")
    assert info.value.message == "expected 'chosen' to have messages after those it shares with 'rejected', got none " \
                                 "('chosen' is the start of 'rejected')"
    with pytest.raises(DataError) as info:
        load([{"chosen": [u("A"), a("b")], "rejected": [u("A"), a("c")]}, {"chosen": [u("A"), a("b")],
                                                                            "rejected": [u("A"), a("b")]}])
    assert (info.value.row, info.value.field, info.value.reason) == (1, "rejected", "identical chosen and rejected")
    with pytest.raises(
        DataError, match=r"field 'rejected': expected a list of messages like 'prompt', got text"
    ):
        load([{"chosen": [u("A"), a("b")], "rejected": "A b"}])


def hh(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_hh_rlhf_multi_turn_parsing():
    row = {
        "chosen": hh("  Hi there  ", "Hello!\nHow can I help?", "Name a fruit.", "An apple.\n"),
        "rejected": hh("  Hi there  ", "Hello!\nHow can I help?", "Name a fruit.", "No."),
    }
    assert load([row]).to_list() == [
        {
            "prompt": [u("Hi there"), a("Hello!\nHow can I help?"), u("Name a fruit.")],
            "chosen": [a("An apple.")],
            "rejected": [a("No.")],
        }
    ]


def test_hh_rlhf_bad_transcripts():
    def error(chosen, rejected):
        with pytest.raises(DataError) as info:
            load([{"chosen": chosen, "rejected": rejected}], format="hh_rlhf")
        return info.value

    # diverging before the last assistant turn
    err = error(hh("a", "b", "c", "d"), hh("a", "x", "c", "d"))
    assert (
        err.field == "chosen"
        and "expected one assistant turn after the shared conversation, got 3 turns" in str(err)
    )
    err = error(hh("a", "b"), hh("a"))
    assert err.field == "rejected" and err.message.endswith("got 0 turns (none)")
    err = error("preamble" + hh("a", "b"), hh("a", "c"))
    assert err.message.endswith("got text before the first turn")
    err = error(hh("a", "b"), hh("z", "c"))
    assert err.reason == "no shared prompt"
    err = error(hh("a", " "), hh("a", "c"))  # empty final answer
    assert (err.field, err.reason) == ("chosen", "malformed message")
    assert err.message == "message 0: expected 'content' to be non-empty text, got empty text"


def test_hh_rlhf_cn_role_checks():
    row = {"context": [{"role": "human", "text": "hi"}], "chosen": {"role": "assistant", "text": "a"},
           "rejected": {"role": "human", "text": "b"}}  # fmt: skip
    with pytest.raises(
        DataError,
        match=r"field 'rejected': expected a dict with 'role' \('assistant'\) and 'text', got role 'human'",
    ):
        load([row])
    row["rejected"] = {"role": "assistant", "text": None}
    with pytest.raises(
        DataError, match=r"field 'rejected': message 0: expected 'content' to be non-empty text, got None"
    ):
        load([row])
    row["rejected"], row["context"] = {"role": "assistant", "text": "b"}, []
    with pytest.raises(
        DataError, match=r"field 'context': expected a non-empty list of \{'role', 'text'\} turns"
    ):
        load([row])


def test_listwise_ranks_and_scores():
    assert load([{"prompt": "p", "responses": ["a", "b"], "ranks": [2, 1]}])[0]["scores"] == [-2.0, -1.0]
    # per row: scores when given, else ranks
    mixed = [{"prompt": "p", "responses": ["a", "b"], "scores": [0.5, 1]},
             {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}]  # fmt: skip
    assert load(mixed)["scores"] == [[0.5, 1.0], [-1.0, -1.0]]
    with pytest.raises(DataError, match=r"field 'ranks': expected one rank per response \(2\), got 3"):
        load([{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2, 3]}])
    with pytest.raises(DataError, match=r"field 'ranks': .*got float 1.0"):
        load([{"prompt": "p", "responses": ["a", "b"], "ranks": [1.0, 2]}])


def test_messages_format_needs_a_final_assistant_turn():
    with pytest.raises(
        DataError, match=r"field 'messages': expected a conversation of at least 2 messages ending"
    ):
        load([{"messages": [u("a"), a("b"), u("c")]}])
    with pytest.raises(DataError, match="got 1 message ending with role 'assistant'"):
        load([{"messages": [a("b")]}])


def test_chatllama_json_array(tmp_path):
    path = tmp_path / "reward.json"
    path.write_text(
        json.dumps(
            read_rows("chatllama_reward.jsonl") + [{"user_input": "Q", "completion": "A", "score": None}]
        )
    )
    with pytest.raises(
        DataError, match=r"reward.json: row 2, field 'score': expected a finite number, got None"
    ):
        load(path)
    with pytest.raises(DataError, match=r"row 0, field 'user_input': expected non-empty text"):
        load([{"user_input": "", "completion": "x"}])


def test_an_empty_system_message_is_kept_and_other_empty_messages_are_errors():
    system = {"role": "system", "content": ""}
    ds = load([{"messages": [system, u("Hi"), a("Hello!")]}])
    assert ds[0] == {"prompt": [system, u("Hi")], "completion": [a("Hello!")]}
    ds = load([{"prompt": [{"role": "system", "content": " "}, u("Hi")], "chosen": [a("yes")], "rejected": [a("no")]}])
    assert ds[0]["prompt"][0] == {"role": "system", "content": " "}
    for empty in ({"role": "user", "content": ""}, {"role": "system", "content": None}):
        with pytest.raises(DataError, match=r"row 0, field 'messages': message 0: expected 'content' to be non-empty"):
            load([{"messages": [empty, u("Hi"), a("Hello!")]}])


def test_margin_is_kept_as_float():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
        {"prompt": "p", "chosen": "c", "rejected": "d", "margin": 0.5},
    ]
    ds = load(rows)
    assert ds.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert ds["margin"] == [2.0, 0.5] and ds.features["margin"].dtype == "float64"
    with pytest.raises(DataError, match=r"row 1, field 'margin': expected a finite number, got nothing"):
        load([rows[0], {"prompt": "p", "chosen": "c", "rejected": "d"}])


# ----------------------------------------------------------------------------------------- validation errors

M = [u("hi")]
BAD = [
    # (rows, bad row, field, reason, message)
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}], 1, "rejected", "missing column",
     "expected non-empty text or list of messages, got nothing (the column is missing)"),
    ([{"prompt": "p", "chosen": "a", "rejected": None}], 0, "rejected", "null value",
     "expected non-empty text or list of messages, got None"),
    ([{"prompt": " \n", "chosen": "a", "rejected": "b"}], 0, "prompt", "empty text",
     "expected non-empty text or list of messages, got empty text"),
    ([{"prompt": "p", "chosen": 5, "rejected": "b"}], 0, "chosen", "wrong type",
     "expected non-empty text or list of messages, got int 5"),
    ([{"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}], 0, "chosen", "wrong type",
     "expected non-empty text or list of messages, got a dict with keys ['text']"),
    ([{"prompt": "p", "chosen": [], "rejected": "b"}], 0, "chosen", "wrong type",
     "expected non-empty text or list of messages, got a list of 0 items"),
    ([{"prompt": [{"role": "user"}], "completion": [a("x")]}], 0, "prompt", "malformed message",
     "message 0: expected 'content' to be non-empty text, got nothing (the column is missing)"),
    ([{"prompt": [u("a"), {"role": 1, "content": "b"}], "completion": [a("x")]}], 0, "prompt", "malformed message",
     "message 1: expected 'role' to be a non-empty string, got int 1"),
    ([{"prompt": ["hello"], "completion": [a("x")]}], 0, "prompt", "malformed message",
     "message 0: expected a dict with 'role' and 'content', got text 'hello'"),
    ([{"prompt": M, "completion": "x"}], 0, "completion", "mixed text and messages",
     "expected a list of messages like 'prompt', got text"),
    ([{"prompt": "p", "completion": "x", "score": float("nan")}], 0, "score", "not finite",
     "expected a finite number, got float nan"),
    ([{"prompt": "p", "completion": "x", "score": float("-inf")}], 0, "score", "not finite",
     "expected a finite number, got float -inf"),
    ([{"prompt": "p", "completion": "x", "score": "0.5"}], 0, "score", "wrong type",
     "expected a finite number, got text '0.5'"),
    ([{"prompt": "p", "completion": "x", "score": True}], 0, "score", "wrong type",
     "expected a finite number, got bool True"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}], 0, "margin", "not finite",
     "expected a finite number, got float inf"),
    ([{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]}], 0, "scores", "length mismatch",
     "expected one score per response (3), got 2"),
    ([{"prompt": "p", "responses": ["a"], "scores": [1]}], 0, "responses", "fewer than 2 responses",
     "expected a list of at least 2 completions, got a list of 1 item"),
    ([{"prompt": "p", "responses": ["a", "b", "a"], "scores": [1, 2, 3]}], 0, "responses", "identical responses",
     "expected distinct responses, got response 2 equal to response 0"),
    ([{"prompt": "p", "responses": ["a", None], "scores": [1, 2]}], 0, "responses", "null value",
     "response 1: expected non-empty text or list of messages, got None"),
    ([{"prompt": "p", "responses": ["a", "b"], "scores": [1, None]}], 0, "scores", "null value",
     "expected a finite number, got None"),
    ([{"prompt": "p", "completion": "x", "label": 1}], 0, "label", "not a boolean",
     "expected a boolean label (true or false), got int 1"),
    ([{"prompt": "p", "completion": "x", "label": "true"}], 0, "label", "not a boolean",
     "expected a boolean label (true or false), got text 'true'"),
    ([{"prompt": M, "chosen": [a("same")], "rejected": [a("same")]}], 0, "rejected", "identical chosen and rejected",
     "expected 'rejected' to differ from 'chosen', got the same completion"),
    ([{"prompt": "p", "completion": "x"}, {"prompt": M, "completion": [a("y")]}], 1, "prompt",
     "mixed text and messages", "expected text like row 0, got a list of messages; all rows must use the same form"),
    ([{"prompt": "p"}, ["not", "a", "dict"]], 1, None, "not an object",
     "expected a row as a dict/JSON object, got a list of 3 items"),
    ([{"user_input": 3}], 0, "user_input", "wrong type", "expected non-empty text or list of messages, got int 3"),
    ([{"messages": [u("q"), {"role": "assistant", "content": 2}]}], 0, "messages", "malformed message",
     "message 1: expected 'content' to be non-empty text, got int 2"),
]  # fmt: skip


@pytest.mark.parametrize("rows, row, field, reason, message", BAD)
def test_bad_rows_raise_data_error_naming_row_and_field(rows, row, field, reason, message):
    with pytest.raises(DataError) as info:
        load(rows)
    err = info.value
    assert (err.source, err.row, err.line, err.field, err.reason) == ("rows", row, None, field, reason)
    assert err.message == message
    where = f"row {row}" + (f", field {field!r}" if field else "")
    assert str(err) == f"rows: {where}: {message}"


@pytest.mark.parametrize("rows, row, field, reason, message", BAD)
def test_drop_invalid_drops_exactly_the_bad_row(rows, row, field, reason, message):
    report = validate(rows)
    assert report.kept == len(rows) - 1
    assert report.dropped == {(f"{field}: {reason}" if field else reason): 1}
    assert report.examples[0].row == row


def test_drop_invalid_counts_and_warns(caplog):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    rows = [
        good,
        {**good, "chosen": None},
        good,
        {**good, "rejected": "a"},
        {**good, "chosen": ""},
        {**good, "chosen": None},
    ]
    with caplog.at_level(logging.WARNING, logger="hfrlhf.data.formats"):
        ds = load(rows, drop_invalid=True)
    assert ds.num_rows == 2
    assert "rows: kept 2 of 6 rows (pairwise), dropped 4: 2 x chosen: null value" in caplog.text
    report = validate(rows)
    assert (report.kept, report.num_dropped) == (2, 4)
    assert report.dropped == {
        "chosen: null value": 2,
        "rejected: identical chosen and rejected": 1,
        "chosen: empty text": 1,
    }
    assert [e.row for e in report.examples] == [1, 3, 4]
    assert str(report).endswith(
        "; first: rows: row 1, field 'chosen': expected non-empty text or list of messages, got None"
    )


def test_drop_invalid_keeps_the_form_of_the_first_valid_row():
    rows = [{"prompt": None}, {"prompt": [u("a")]}, {"prompt": "text"}, {"prompt": [u("b")]}]
    assert load(rows, drop_invalid=True)["prompt"] == [[u("a")], [u("b")]]


def test_all_rows_invalid_is_an_error():
    with pytest.raises(DataError, match=r"no valid rows left: rows: kept 0 of 2 rows"):
        load([{"prompt": None}, {"prompt": 1}], drop_invalid=True)


def test_data_error_pickles_with_its_location():
    err = DataError("expected x, got y", source="f.jsonl", row=1, line=2, field="chosen", reason="r")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.row, back.line, back.field, back.reason) == (str(err), 1, 2, "chosen", "r")
    assert str(DataError("plain")) == "plain"
    assert str(DataError("m", field="f")) == "field 'f': m"


# -------------------------------------------------------------------------------------- kinds and conversion


def test_record_kind():
    assert record_kind(["prompt", "responses", "scores"]) == "listwise"
    assert record_kind(["prompt", "completion", "label"]) == "unpaired"
    assert record_kind(["prompt_ids", "prompt"]) == "prompt"
    with pytest.raises(DataError, match=r"expected the columns of a canonical kind .* got \['chosen'\]"):
        record_kind(["chosen"])


def test_load_with_kind_converts_or_fails_clearly():
    pairs = load(EXAMPLES_DIR / "pairwise_text.jsonl", kind="unpaired")
    assert pairs.num_rows == 6 and pairs["label"] == [True, False] * 3
    prompts = load(EXAMPLES_DIR / "pointwise.jsonl", kind="prompt")
    assert prompts["prompt"] == ["Rate this idea: a picnic in the park.", "Describe fresh bread."]
    listwise = load(EXAMPLES_DIR / "listwise_scores.jsonl", kind="pairwise")
    assert listwise.num_rows == 3 + 5
    with pytest.raises(
        DataError, match=r"expected pairwise data, got sft data .*; sft data converts to: prompt"
    ):
        load(EXAMPLES_DIR / "sft.jsonl", kind="pairwise")
    with pytest.raises(ValueError, match="unknown kind 'dpo'; expected one of: pairwise, listwise"):
        load(EXAMPLES_DIR / "sft.jsonl", kind="dpo")
    same = load(EXAMPLES_DIR / "sft.jsonl")
    assert convert_kind(same, "sft") is same


# ------------------------------------------------------------------------------------- language modeling (text)


def test_text_rows_are_language_modeling_records():
    ds = load([{"text": "  Hello world.\n", "source": "web"}, {"text": "Bye."}])
    assert record_kind(ds) == "text" and ds.column_names == ["text"]
    assert ds["text"] == ["  Hello world.\n", "Bye."]  # kept exactly, whitespace included
    assert load([{"text": "Hi"}], format="text")["text"] == ["Hi"]
    with pytest.raises(DataError) as err:
        load([{"text": "Hi"}, {"text": "   "}])
    assert (err.value.row, err.value.field, err.value.reason) == (1, "text", "empty text")
    with pytest.raises(DataError, match=r"row 0, field 'text': expected non-empty text \(a conversation goes in a "
                                        r"'messages' column\), got a list of 1 item"):
        load([{"text": [{"role": "user", "content": "hi"}]}])


def test_other_schemas_win_over_a_text_column_next_to_them(caplog):
    with caplog.at_level(logging.WARNING):
        ds = load([{"prompt": "Q", "completion": " A", "text": "Q A"}])
    assert record_kind(ds) == "sft"
    assert "read as 'sft'; ignoring columns ['text']" in caplog.text


@pytest.mark.parametrize("rows,row,fmt", [
    ([{"prompt": "Q", "completion": " A"}, {"text": "Some text."}], 1, "'sft' schema (columns completion, prompt)"),
    ([{"text": "Some text."}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
     0, "'messages' schema (columns messages)"),
    ([{"prompt": "Q"}, {"prompt": "R"}, {"text": "Some text."}], 2, "'prompt' schema (columns prompt)"),
])
def test_text_rows_mixed_with_another_schema_name_the_row(tmp_path, rows, row, fmt):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load(path)
    assert (err.value.row, err.value.line, err.value.field, err.value.reason) == (row, row + 1, "text", "mixed schemas")
    assert str(err.value) == (
        f"{path}: row {row} (line {row + 1}), field 'text': expected a row of the {fmt} like the other rows, got a "
        "language-modeling row (a 'text' column); text rows cannot share a dataset with another schema: give them "
        "in a dataset of their own")
    report = validate(path)  # drop_invalid counts them like any bad row
    assert report.kept == len(rows) - 1 and report.dropped == {"text: mixed schemas": 1}


@pytest.mark.parametrize("kind", ["pairwise", "listwise", "unpaired", "sft", "prompt"])
def test_text_records_convert_to_no_other_kind(kind):
    ds = load(EXAMPLES_DIR / "text.jsonl")
    with pytest.raises(DataError) as err:
        convert_kind(ds, kind)
    assert err.value.reason == "text data"
    assert str(err.value) == (
        f"expected {kind} data, got text data (columns ['text']): language-modeling rows (a lone 'text' column) have "
        "no prompt, completion or preference to learn from; only SFTTrainer (hfrlhf sft) and PPOTrainer's "
        "ptx_dataset train on them")
    with pytest.raises(DataError, match="expected text data, got sft data"):
        load(EXAMPLES_DIR / "sft.jsonl", kind="text")


# ------------------------------------------------------------------------------------------ property tests

FIELDS = ["prompt", "chosen", "rejected", "completion", "label", "score", "margin", "responses", "scores",
          "ranks", "messages", "user_input", "context"]  # fmt: skip
scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(), st.text(max_size=6),
    st.sampled_from(["", " ", "\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: hi\n\nAssistant: no"]),
)  # fmt: skip
message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "human"]), "content": st.text(max_size=4)}
    ),
    st.fixed_dictionaries({"role": scalar, "text": scalar}),
    st.dictionaries(st.sampled_from(["role", "content", "text", "name"]), scalar, max_size=3),
)
value = st.recursive(st.one_of(scalar, message), lambda inner: st.lists(inner, max_size=4), max_leaves=8)
row = st.dictionaries(st.sampled_from(FIELDS), value, min_size=1, max_size=5)


def assert_canonical(ds):
    """Every record is a canonical record of its kind: checked here independently of the loader."""
    kind = record_kind(ds)
    assert set(ds.column_names) <= set(KINDS[kind]) | {"margin"}

    def is_messages(v):
        return isinstance(v, list) and len(v) > 0 and all(
            set(m) == {"role", "content"} and isinstance(m["role"], str) and m["role"].strip()
            and isinstance(m["content"], str) and (m["content"].strip() or m["role"] == "system") for m in v
        )  # fmt: skip

    def is_text(v):
        return isinstance(v, str) and v.strip() != ""

    records = ds.to_list()
    form = is_text if is_text(records[0]["prompt"]) else is_messages
    for r in records:
        completions = (
            r["responses"]
            if kind == "listwise"
            else [r[k] for k in ("chosen", "rejected", "completion") if k in r]
        )
        assert all(form(v) for v in [r["prompt"], *completions])
        if kind == "pairwise":
            assert r["chosen"] != r["rejected"]
        if kind == "listwise":
            assert len(r["responses"]) == len(r["scores"]) >= 2
        for key in ("score", "margin"):
            if key in r:
                assert isinstance(r[key], float) and math.isfinite(r[key])
        for s in r.get("scores", []):
            assert isinstance(s, float) and math.isfinite(s)
        if kind == "unpaired":
            assert isinstance(r["label"], bool)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(row, min_size=1, max_size=4), drop=st.booleans())
def test_arbitrary_rows_load_or_raise_data_error(rows, drop):
    try:
        ds = load(rows, drop_invalid=drop)
    except DataError:
        return
    assert ds.num_rows >= 1
    assert_canonical(ds)


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        st.one_of(st.binary(max_size=12), row.map(lambda r: json.dumps(r).encode())), min_size=1, max_size=4
    )
)
def test_arbitrary_jsonl_bytes_load_or_raise_data_error(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("prop") / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        ds = load(path, drop_invalid=True)
    except DataError:
        return
    assert_canonical(ds)
