"""Tokenization: prompt/completion boundary, single EOS, truncation, errors, non-prefix chat templates."""

from __future__ import annotations

import pytest
from datasets import Dataset

from hfrlhf.data.collators import SFTCollator
from hfrlhf.data.errors import DataError
from hfrlhf.data.tokenize import (
    tokenize_dataset,
    tokenize_prompt_completion,
    tokenize_prompt_completions,
    tokenize_text,
)
from hfrlhf.models.tiny import build_tiny_tokenizer

TOK = build_tiny_tokenizer()
EOS = TOK.eos_token_id


def enc(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


# words that are single tokens of the tiny vocabulary, so expected ids can be written out
[THE], [WAS], [AND], [CAP_THE] = (enc(w) for w in (" the", " was", " and", " The"))


USER = [{"role": "user", "content": "hi there"}]
PROMPT_TEXT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- boundaries and EOS

def test_chat_boundary_and_single_eos():
    pair = tokenize_prompt_completion(TOK, USER, assistant("hello"))
    assert pair.prompt_ids == enc(PROMPT_TEXT)
    # the template writes "hello<|im_end|>\n": its EOS is kept once and the newline after it dropped
    assert pair.completion_ids == enc("hello") + [EOS]
    assert pair.completion_ids.count(EOS) == 1
    assert not pair.truncated
    full = TOK.apply_chat_template(USER + assistant("hello"), tokenize=False)
    assert TOK.decode(pair.prompt_ids + pair.completion_ids) == full.rstrip("\n")


def test_chat_multi_turn_completion_keeps_every_turn():
    completion = assistant("hello") + [{"role": "user", "content": "the"}] + assistant("was")
    pair = tokenize_prompt_completion(TOK, USER, completion)
    expected = "hello<|im_end|>\n<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\nwas<|im_end|>"
    assert pair.completion_ids == enc(expected)
    assert pair.completion_ids[-1] == EOS and pair.completion_ids.count(EOS) == 3


def test_plain_text_no_special_tokens_but_eos():
    pair = tokenize_prompt_completion(TOK, "Question: the? Answer:", " the")
    assert pair.prompt_ids == enc("Question: the? Answer:")
    assert pair.completion_ids == [THE, EOS]
    assert EOS not in pair.prompt_ids


def test_plain_text_prompt_and_completion_tokenized_separately():
    # " th" + "e" is one token " the" when tokenized as one string; the prompt must be what generation sees
    pair = tokenize_prompt_completion(TOK, " th", "e")
    assert pair.prompt_ids == enc(" th") == [260, 74] and pair.completion_ids == [71, EOS]
    assert enc(" the") == [THE]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" the<|im_end|>", [THE, EOS]),  # EOS already there: not doubled
        (" the<|im_end|>\n", [THE, EOS]),  # whitespace after the final EOS dropped
        (" the<|im_end|><|im_end|>", [THE, EOS]),  # a run of EOS collapsed
        (" the<|im_end|> the", [THE, EOS, THE, EOS]),  # text after an EOS is kept, EOS appended
        ("", [EOS]),
    ],
)
def test_plain_text_eos_exactly_once_at_end(completion, expected):
    assert tokenize_prompt_completion(TOK, "Q:", completion).completion_ids == expected


# ---------------------------------------------------------------- truncation

def test_max_prompt_length_keeps_the_end_of_the_prompt():
    prompt = "The food was good and the staff were kind."
    full = enc(prompt)
    pair = tokenize_prompt_completion(TOK, prompt, " the", max_prompt_length=5)
    assert len(full) > 5
    assert pair.prompt_ids == full[-5:]
    assert pair.completion_ids == [THE, EOS]
    assert pair.truncated


def test_completion_cut_to_max_length_keeping_its_start():
    completion = " the was and the"  # 4 tokens + EOS
    assert enc(completion) == [THE, WAS, AND, THE]
    pair = tokenize_prompt_completion(TOK, " The", completion, max_length=4)
    assert pair.prompt_ids == [CAP_THE]
    assert pair.completion_ids == [THE, WAS, AND]  # cut: no EOS
    assert pair.truncated
    exact = tokenize_prompt_completion(TOK, " The", completion, max_length=6)
    assert exact.completion_ids == [THE, WAS, AND, THE, EOS] and not exact.truncated


def test_no_room_for_completion_is_a_data_error():
    with pytest.raises(DataError) as info:
        tokenize_prompt_completion(TOK, " The the was", " and", max_length=3)
    assert info.value.field == "prompt"
    assert "no room" in str(info.value)


def test_pair_shares_one_prompt_and_one_budget():
    group = tokenize_prompt_completions(
        TOK, " The the the was", [" and", " the and was and"], max_length=5, max_prompt_length=2
    )
    assert group.prompt_ids == [THE, WAS]
    assert group.completions_ids == [[AND, EOS], [THE, AND, WAS]]
    assert group.truncated


def test_form_mismatch_names_the_field():
    with pytest.raises(DataError) as info:
        tokenize_prompt_completions(TOK, USER, [assistant("ok"), "plain"], fields=["chosen", "rejected"])
    assert info.value.field == "rejected"


# ---------------------------------------------------------------- templates that break the prefix property

# The generation prompt opens an empty thinking block that a written assistant turn does not have
# (as Qwen3 does with thinking disabled), so the rendered prompt is not a prefix of the conversation.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)
# A default system message that changes once the conversation ends with an answer: an earlier turn differs.
SYSTEM_TEMPLATE = (
    "{% if messages[-1]['role'] == 'assistant' %}<|im_start|>system\nThe answered<|im_end|>\n"
    "{% else %}<|im_start|>system\nThe open<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "prompt_text"),
    [
        (THINK_TEMPLATE, PROMPT_TEXT + "<think>\n\n</think>\n\n"),
        (SYSTEM_TEMPLATE, "<|im_start|>system\nThe open<|im_end|>\n" + PROMPT_TEXT),
    ],
)
def test_template_whose_prompt_is_not_a_prefix(template, prompt_text):
    tok = build_tiny_tokenizer()
    tok.chat_template = template
    rendered_prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(USER + assistant("hello"), tokenize=False)
    assert rendered_prompt == prompt_text and not full.startswith(prompt_text)
    with pytest.warns(UserWarning, match="prefix"):
        pair = tokenize_prompt_completion(tok, USER, assistant("hello"))
    assert pair.prompt_ids == enc(prompt_text)  # the prompt exactly as generation renders it
    assert pair.completion_ids == enc("hello") + [EOS]  # nothing of the answer dropped, EOS once
    with pytest.warns(UserWarning):
        multi = tokenize_prompt_completion(tok, USER, assistant("hello") + [{"role": "user", "content": "the"}] + assistant("was"))
    assert multi.completion_ids == enc("hello<|im_end|>\n<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\nwas") + [EOS]


def test_template_where_the_completion_cannot_be_located_raises():
    tok = build_tiny_tokenizer()
    # the answer is never written: nothing after the prompt can be trusted
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\nX{% endif %}"
    )
    with pytest.raises(DataError, match="could not find"):
        tokenize_prompt_completion(tok, USER, assistant("hello"))


# ---------------------------------------------------------------- datasets

def test_pairwise_chat_dataset():
    rows = Dataset.from_list([
        {"prompt": USER, "chosen": assistant("hello"), "rejected": assistant("the was"), "margin": 2.0, "id": "a"},
    ])
    out = tokenize_dataset(rows, TOK)
    assert out.column_names == [
        "margin", "id", "prompt_ids", "chosen_ids", "rejected_ids", "num_prompt_tokens", "num_completion_tokens", "truncated",
    ]
    row = out[0]
    assert row["prompt_ids"] == enc(PROMPT_TEXT)
    assert row["chosen_ids"] == enc("hello") + [EOS]
    assert row["rejected_ids"] == enc("the was") + [EOS]
    assert row["num_prompt_tokens"] == len(enc(PROMPT_TEXT))
    assert row["num_completion_tokens"] == [len(enc("hello")) + 1, len(enc("the was")) + 1]
    assert (row["margin"], row["id"], row["truncated"]) == (2.0, "a", False)


def test_listwise_dataset_shares_the_prompt():
    rows = Dataset.from_list([
        {"prompt": " The the was", "responses": [" and", " the and was and", " was"], "scores": [1.0, 0.0, -1.0]},
        {"prompt": " and", "responses": [" the", " was"], "scores": [0.0, 2.0]},
    ])
    out = tokenize_dataset(rows, TOK, max_length=5, max_prompt_length=2)
    assert out[0]["prompt_ids"] == [THE, WAS]
    assert out[0]["responses_ids"] == [[AND, EOS], [THE, AND, WAS], [WAS, EOS]]
    assert out[0]["num_completion_tokens"] == [2, 3, 2]
    assert out[0]["truncated"] is True
    assert out[1]["prompt_ids"] == [AND] and out[1]["responses_ids"] == [[THE, EOS], [WAS, EOS]]
    assert out[1]["truncated"] is False
    assert out["scores"] == [[1.0, 0.0, -1.0], [0.0, 2.0]]


@pytest.mark.parametrize(
    ("extra", "kind"),
    [({"label": True}, "unpaired"), ({"score": 0.5}, "pointwise"), ({}, "sft")],
)
def test_single_completion_kinds(extra, kind):
    rows = Dataset.from_list([{"prompt": " The", "completion": " the was", **extra}])
    out = tokenize_dataset(rows, TOK)
    assert out.column_names == [*extra, "prompt_ids", "completion_ids", "num_prompt_tokens", "num_completion_tokens", "truncated"]
    assert out[0]["prompt_ids"] == [CAP_THE] and out[0]["completion_ids"] == [THE, WAS, EOS]
    assert out[0]["num_completion_tokens"] == 3
    for key, value in extra.items():
        assert out[0][key] == value


def test_prompt_only_dataset_has_generation_prompt():
    out = tokenize_dataset(Dataset.from_list([{"prompt": USER}]), TOK)
    assert out.column_names == ["prompt_ids", "num_prompt_tokens", "num_completion_tokens", "truncated"]
    assert out[0]["prompt_ids"] == enc(PROMPT_TEXT)
    assert TOK.decode(out[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert out[0]["num_completion_tokens"] == 0


LONG = " The the was and the was"  # 6 tokens
ROWS = [
    {"prompt": " The", "chosen": " the", "rejected": " was"},
    {"prompt": LONG, "chosen": " the", "rejected": " was"},
    {"prompt": " and", "chosen": " the", "rejected": " was and"},
]


def test_dataset_error_names_source_row_and_field():
    with pytest.raises(DataError) as info:
        tokenize_dataset(Dataset.from_list(ROWS), TOK, max_length=6, source="prefs.jsonl")
    err = info.value
    assert (err.source, err.row, err.field) == ("prefs.jsonl", 1, "prompt")
    assert str(err).startswith("prefs.jsonl: row 1, field 'prompt': ")


def test_drop_invalid_drops_rows_that_cannot_fit():
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        out = tokenize_dataset(Dataset.from_list(ROWS), TOK, max_length=6, drop_invalid=True)
    assert out["prompt_ids"] == [[CAP_THE], [AND]]
    assert out["rejected_ids"] == [[WAS, EOS], [WAS, AND, EOS]]


def test_form_error_in_dataset_is_raised_even_with_drop_invalid():
    rows = Dataset.from_list([
        {"prompt": USER, "chosen": assistant("ok"), "rejected": assistant("no")},
        {"prompt": USER, "chosen": assistant("ok"), "rejected": assistant("no")},
    ])
    bad = rows.add_column("plain", ["a", "b"]).remove_columns("rejected").rename_column("plain", "rejected")
    with pytest.raises(DataError) as info:
        tokenize_dataset(bad, TOK, drop_invalid=True)
    assert (info.value.row, info.value.field) == (0, "rejected")


def test_prompt_length_must_leave_room():
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_dataset(Dataset.from_list(ROWS), TOK, max_length=4, max_prompt_length=4)


def test_a_chat_template_that_refuses_a_conversation_names_the_row_and_field():
    """Templates that check the roles (Llama 2, Mistral) raise a jinja TemplateError; it becomes a DataError naming
    the row and the field whose rendering failed, instead of a traceback from inside jinja."""
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    user, bot = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    rows = Dataset.from_list([{"prompt": [user], "chosen": [bot], "rejected": [{**bot, "content": "Go"}]},
                              {"prompt": [user], "chosen": [bot], "rejected": [user]},
                              {"prompt": [user, user], "chosen": [bot], "rejected": [{**bot, "content": "Go"}]}])
    with pytest.raises(DataError) as err:
        tokenize_dataset(rows, tok)
    assert (err.value.row, err.value.field, err.value.reason) == (1, "rejected", "chat template error")
    assert err.value.message == ("the chat template refused the conversation (user, user): Conversation roles must "
                                 "alternate user/assistant/user/assistant/...")
    with pytest.raises(DataError) as err:
        tokenize_dataset(rows.select([0, 2]), tok)
    assert (err.value.row, err.value.field) == (1, "prompt")


# ------------------------------------------------------------------------------------------- language modeling


def test_text_row_is_an_sft_record_scoring_every_token_after_the_first():
    tok = build_tiny_tokenizer()
    # by hand: the byte-level BPE splits " The was the and" into the vocabulary entries below (Ġ marks the
    # space); no BOS is added, and EOS (<|im_end|>) is appended once
    the, was, the_, and_ = tok.convert_tokens_to_ids(["ĠThe", "Ġwas", "Ġthe", "Ġand"])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = tokenize_dataset(Dataset.from_list([{"text": " The was the and"}]), tok)
    assert out.column_names == ["prompt_ids", "completion_ids", "num_prompt_tokens", "num_completion_tokens",
                                "truncated"]
    row = out[0]
    assert row["prompt_ids"] == [the]
    assert row["completion_ids"] == [was, the_, and_, eos]
    assert (row["num_prompt_tokens"], row["num_completion_tokens"], row["truncated"]) == (1, 4, False)
    # the SFT batch scores every token that has a predecessor: all but the first
    batch = SFTCollator(pad_token_id=eos, index_keys=False)([row])
    assert batch["input_ids"].tolist() == [[the, was, the_, and_, eos]]
    assert batch["labels"].tolist() == [[-100, was, the_, and_, eos]]
    # an EOS the text already ends with is kept, not doubled
    assert tokenize_text(tok, " The was<|im_end|>").completion_ids == [was, eos]


def test_text_rows_are_cut_to_max_length_keeping_their_start():
    tok = build_tiny_tokenizer()
    the, was, the_ = tok.convert_tokens_to_ids(["ĠThe", "Ġwas", "Ġthe"])
    out = tokenize_dataset(Dataset.from_list([{"text": " The was the and"}, {"text": " The was"}]), tok, max_length=3)
    assert (out[0]["prompt_ids"], out[0]["completion_ids"], out[0]["truncated"]) == ([the], [was, the_], True)
    assert (out[1]["prompt_ids"], out[1]["completion_ids"], out[1]["truncated"]) == ([the], [was, tok.eos_token_id],
                                                                                    False)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_text(tok, " The", max_length=1)
    with pytest.raises(DataError, match="expected text, got list"):
        tokenize_text(tok, [{"role": "user", "content": "hi"}])
