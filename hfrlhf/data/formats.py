"""Load preference and instruction data in any supported schema as canonical records.

:func:`load` is the one entry point. It reads the source (a JSON, JSON Lines or Parquet file, a
``datasets.Dataset`` or ``DatasetDict``, a list of dicts, or a Hub dataset name), detects which source
schema the rows follow, normalises every row to the canonical record of its kind (see
``docs/architecture.md``) and checks every row before anything else runs. A bad row raises
:class:`~hfrlhf.data.errors.DataError` naming the row and the field, or is dropped and counted with
``drop_invalid=True``.

The schemas live in one table, :data:`FORMATS`: each entry says which columns it needs, which canonical
kind it produces and how to turn one source row into one canonical record. Detection walks the table in
order and takes the first entry whose columns are present, so more specific schemas come first.

>>> ds = load(EXAMPLES_DIR / "hh_rlhf.jsonl")
>>> record_kind(ds), ds.num_rows
('pairwise', 3)
>>> ds[0]["prompt"][-1]
{'role': 'user', 'content': 'What is a good way to keep basil alive indoors?'}
>>> ds[0]["chosen"]
[{'role': 'assistant', 'content': 'Give it a sunny windowsill, water it when the top of the soil feels dry, and pinch off the flower buds so it keeps making leaves.'}]
>>> load([{"prompt": "2+2=", "completion": " 4"}]).to_list()
[{'prompt': '2+2=', 'completion': ' 4'}]
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value

from hfrlhf.data import convert
from hfrlhf.data.errors import DataError

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
"""Directory of small example files, one per source schema (used by the docs and tests)."""

# canonical kind -> its required columns, in the order record_kind tries them
KINDS: dict[str, tuple[str, ...]] = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "listwise": ("prompt", "responses", "scores"),
    "unpaired": ("prompt", "completion", "label"),
    "pointwise": ("prompt", "completion", "score"),
    "sft": ("prompt", "completion"),
    "prompt": ("prompt",),
    "text": ("text",),  # language modeling: every token is trained on, there is no prompt
}
# optional canonical columns, kept when the source has them
_OPTIONAL: dict[str, tuple[str, ...]] = {"pairwise": ("margin",)}

TEXT_TRAINERS = "only SFTTrainer (hfrlhf sft) and PPOTrainer's ptx_dataset"
"""Who takes ``text`` (language-modeling) records; other trainers' errors name them."""

Source = Union[str, "os.PathLike[str]", Dataset, DatasetDict, Sequence[Mapping[str, Any]]]

_MISSING: Any = object()  # a column absent from a row (distinct from an explicit None)
_TEXT_OR_MESSAGES = "non-empty text or list of messages"
_short_repr = reprlib.Repr()
_short_repr.maxstring = 40
_short_repr.maxother = 40


# ---------------------------------------------------------------------------------------------------------
# field checks: each returns the clean value or raises DataError(field=...) without a location; the row
# loop adds source, row and line.


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the column is missing)"
    if value is None:
        return "None"
    if isinstance(value, str):
        return "empty text" if not value.strip() else f"text {_short_repr.repr(value)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(str(k) for k in value)}"
    try:
        return f"{type(value).__name__} {_short_repr.repr(value)}"
    except Exception:  # a user object whose repr fails still gets a message
        return type(value).__name__


def _fail(field: str, expected: str, value: Any, reason: str = "wrong type") -> DataError:
    if value is _MISSING:
        reason = "missing column"
    elif value is None:
        reason = "null value"
    elif isinstance(value, str) and not value.strip():
        reason = "empty text"
    return DataError(f"expected {expected}, got {_describe(value)}", field=field, reason=reason)


def _utf8(text: str, field: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"expected valid Unicode text, got a lone surrogate at character {err.start}",
            field=field,
            reason="invalid unicode",
        ) from None
    return text


def _text(value: Any, field: str, expected: str = "non-empty text") -> str:
    if isinstance(value, str) and value.strip():
        return _utf8(value, field)
    raise _fail(field, expected, value)


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """A non-empty list of ``{"role": str, "content": str}``; other keys of a message are dropped.

    ``content`` is non-empty text, except in a ``system`` message: an empty system prompt is common in chat
    data (TRL and chat templates take it) and has nothing to learn from anyway, so it is kept as it is.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(field, "a non-empty list of messages", value)
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(
                f"message {i}: expected a dict with 'role' and 'content', got {_describe(message)}",
                field=field,
                reason="malformed message",
            )
        role, content = message.get("role", _MISSING), message.get("content", _MISSING)
        if not isinstance(role, str) or not role.strip():
            raise DataError(
                f"message {i}: expected 'role' to be a non-empty string, got {_describe(role)}",
                field=field,
                reason="malformed message",
            )
        if not isinstance(content, str) or not (content.strip() or role == "system"):
            raise DataError(
                f"message {i}: expected 'content' to be non-empty text, got {_describe(content)}",
                field=field,
                reason="malformed message",
            )
        out.append({"role": _utf8(role, field), "content": _utf8(content, field)})
    return out


def _text_or_messages(value: Any, field: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _text(value, field, _TEXT_OR_MESSAGES)
    if isinstance(value, (list, tuple)) and value:
        return _messages(value, field)
    raise _fail(field, _TEXT_OR_MESSAGES, value)


def _form(value: str | list) -> str:
    return "text" if isinstance(value, str) else "messages"


def _record_form(rec: Mapping[str, Any]) -> str:
    """The form of a canonical record: its prompt's, or ``"text"`` for a language-modeling record."""
    return _form(rec["prompt"]) if "prompt" in rec else "text"


_FORM_NAME = {"text": "text", "messages": "a list of messages"}


def _completion(value: Any, field: str, form: str) -> str | list[dict[str, str]]:
    """A completion in the same form (text or messages) as the prompt of its row."""
    clean = _text_or_messages(value, field)
    if _form(clean) != form:
        raise DataError(
            f"expected {_FORM_NAME[form]} like 'prompt', got {_FORM_NAME[_form(clean)]}",
            field=field,
            reason="mixed text and messages",
        )
    return clean


def _number(value: Any, field: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        try:
            x = float(value)
        except (OverflowError, ValueError, TypeError):
            x = math.nan
        if math.isfinite(x):
            return x
        raise DataError(f"expected a finite number, got {_describe(value)}", field=field, reason="not finite")
    raise _fail(field, "a finite number", value)


def _label(value: Any, field: str) -> bool:
    # Strict on purpose: 0/1 or "true"/"false" are more often a bug (a score column, a string column) than
    # a label; convert them explicitly before loading.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _fail(field, "a boolean label (true or false)", value, reason="not a boolean")


# ---------------------------------------------------------------------------------------------------------
# canonical record checks, one per kind: a record with raw values in -> a clean record out


def _check_pairwise(rec: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _text_or_messages(rec.get("prompt", _MISSING), "prompt")
    form = _form(prompt)
    chosen = _completion(rec.get("chosen", _MISSING), "chosen", form)
    rejected = _completion(rec.get("rejected", _MISSING), "rejected", form)
    if chosen == rejected:
        raise DataError(
            "expected 'rejected' to differ from 'chosen', got the same completion",
            field="rejected",
            reason="identical chosen and rejected",
        )
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "margin" in rec:
        out["margin"] = _number(rec["margin"], "margin")
    return out


def _check_listwise(rec: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _text_or_messages(rec.get("prompt", _MISSING), "prompt")
    form = _form(prompt)
    raw = rec.get("responses", _MISSING)
    if not isinstance(raw, (list, tuple)):
        raise _fail("responses", "a list of at least 2 completions", raw)
    if len(raw) < 2:
        raise DataError(
            f"expected a list of at least 2 completions, got {_describe(raw)}",
            field="responses",
            reason="fewer than 2 responses",
        )
    responses = []
    for i, response in enumerate(raw):
        try:
            responses.append(_completion(response, "responses", form))
        except DataError as err:
            err.message = f"response {i}: {err.message}"
            raise
    for j, response in enumerate(responses):
        if response in responses[:j]:
            raise DataError(
                f"expected distinct responses, got response {j} equal to response {responses.index(response)}",
                field="responses",
                reason="identical responses",
            )
    scores = rec.get("scores", _MISSING)
    if not isinstance(scores, (list, tuple)):
        raise _fail("scores", "a list of scores, one per response", scores)
    if len(scores) != len(responses):
        raise DataError(
            f"expected one score per response ({len(responses)}), got {len(scores)}",
            field="scores",
            reason="length mismatch",
        )
    return {"prompt": prompt, "responses": responses, "scores": [_number(s, "scores") for s in scores]}


def _check_prompt_completion(rec: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _text_or_messages(rec.get("prompt", _MISSING), "prompt")
    return {
        "prompt": prompt,
        "completion": _completion(rec.get("completion", _MISSING), "completion", _form(prompt)),
    }


def _check_unpaired(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {**_check_prompt_completion(rec), "label": _label(rec.get("label", _MISSING), "label")}


def _check_pointwise(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {**_check_prompt_completion(rec), "score": _number(rec.get("score", _MISSING), "score")}


def _check_prompt(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {"prompt": _text_or_messages(rec.get("prompt", _MISSING), "prompt")}


def _check_text(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Language modeling: ``text`` is non-empty plain text (a conversation goes in a ``messages`` column)."""
    value = rec.get("text", _MISSING)
    if isinstance(value, (list, tuple)) and value:
        raise _fail("text", "non-empty text (a conversation goes in a 'messages' column)", value)
    return {"text": _text(value, "text")}


_CHECKS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "pairwise": _check_pairwise,
    "listwise": _check_listwise,
    "unpaired": _check_unpaired,
    "pointwise": _check_pointwise,
    "sft": _check_prompt_completion,
    "prompt": _check_prompt,
    "text": _check_text,
}


# ---------------------------------------------------------------------------------------------------------
# source schema normalisers: one source row -> one canonical record (values are checked afterwards)


def _columns(canonical: str, **renames: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A normaliser that only picks (and renames, ``canonical="source"``) columns."""
    mapping = {name: renames.get(name, name) for name in canonical.split()}

    def normalise(row: Mapping[str, Any]) -> dict[str, Any]:
        return {name: row.get(src, _MISSING) for name, src in mapping.items()}

    return normalise


def _implicit_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """Split whole conversations (or texts) ``chosen``/``rejected`` into a shared prompt and two completions.

    Messages: the prompt is the longest run of identical leading messages. Text: the prompt is the longest
    common prefix cut back to the last whitespace before the texts differ, so each completion starts
    with that whitespace and a whole word (``"The sky is"`` + ``" blue."``), never mid-word.
    """
    chosen = _text_or_messages(row.get("chosen", _MISSING), "chosen")
    rejected = _completion(row.get("rejected", _MISSING), "rejected", _form(chosen))
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str):
        cut = n
        while cut > 0 and not chosen[cut - 1].isspace():
            cut -= 1  # back to the start of the word where the texts differ
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1  # the whitespace before it belongs to the completions
        n = cut if chosen[:cut].strip() else 0
    if n == 0:
        raise DataError(
            "expected 'chosen' and 'rejected' to start with the same prompt, found no shared beginning "
            "(add a 'prompt' column)",
            field="chosen",
            reason="no shared prompt",
        )
    if chosen == rejected:
        raise DataError(
            f"expected 'rejected' to differ from 'chosen', got the same {'text' if isinstance(chosen, str) else 'conversation'}",
            field="rejected",
            reason="identical chosen and rejected",
        )
    for name, value, other in (("chosen", chosen, "rejected"), ("rejected", rejected, "chosen")):
        if n == len(value):  # messages only: a text prefix is cut back to a whole word above
            raise DataError(
                f"expected {name!r} to have messages after those it shares with {other!r}, got none "
                f"({name!r} is the start of {other!r})",
                field=name,
                reason="no completion",
            )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_messages(value: Any, field: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    expected = "an hh-rlhf transcript with '\\n\\nHuman:' and '\\n\\nAssistant:' turns"
    if not isinstance(value, str):
        raise _fail(field, expected, value)
    parts = _HH_TURN.split(value)  # [before, role, text, role, text, ...]
    if len(parts) == 1 or parts[0].strip():
        raise DataError(
            f"expected {expected}, got {'text before the first turn' if len(parts) > 1 else _describe(value)}",
            field=field,
            reason="bad transcript",
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": text.strip()} for r, text in zip(parts[1::2], parts[2::2])]


def _hh_rlhf(row: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic hh-rlhf: the shared turns up to the last human turn are the prompt, then one assistant turn."""
    chosen = _hh_messages(row.get("chosen", _MISSING), "chosen")
    rejected = _hh_messages(row.get("rejected", _MISSING), "rejected")
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    while n > 0 and chosen[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        raise DataError(
            "expected 'chosen' and 'rejected' to share the conversation up to the last human turn, "
            "got different first turns",
            field="chosen",
            reason="no shared prompt",
        )
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        rest = turns[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise DataError(
                f"expected one assistant turn after the shared conversation, got {len(rest)} "
                f"turn{'s' if len(rest) != 1 else ''} ({', '.join(m['role'] for m in rest) or 'none'})",
                field=name,
                reason="bad transcript",
            )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _cn_turn(value: Any, field: str, roles: Mapping[str, str]) -> dict[str, Any]:
    expected = f"a dict with 'role' ({' or '.join(map(repr, roles))}) and 'text'"
    if not isinstance(value, Mapping):
        raise _fail(field, expected, value)
    role = value.get("role", _MISSING)
    if not isinstance(role, str) or role not in roles:
        got = repr(role) if isinstance(role, str) else _describe(role)
        raise DataError(f"expected {expected}, got role {got}", field=field, reason="malformed message")
    return {"role": roles[role], "content": value.get("text", _MISSING)}


def _hh_rlhf_cn(row: Mapping[str, Any]) -> dict[str, Any]:
    """hh_rlhf_cn: ``context`` turns ``{"role": "human"|"assistant", "text"}``, one-turn chosen/rejected."""
    context = row.get("context", _MISSING)
    if not isinstance(context, (list, tuple)) or not context:
        raise _fail("context", "a non-empty list of {'role', 'text'} turns", context)
    prompt = [_cn_turn(turn, "context", {"human": "user", "assistant": "assistant"}) for turn in context]
    out = {"prompt": prompt}
    for name in ("chosen", "rejected"):
        out[name] = [_cn_turn(row.get(name, _MISSING), name, {"assistant": "assistant"})]
    return out


def _listwise(row: Mapping[str, Any]) -> dict[str, Any]:
    """Listwise with ``scores`` (higher is better) or ``ranks`` (1 is best, stored as ``scores = -rank``)."""
    out = {"prompt": row.get("prompt", _MISSING), "responses": row.get("responses", _MISSING)}
    ranks = row.get("ranks", _MISSING)
    if row.get("scores") is not None or ranks is _MISSING or (ranks is None and "scores" in row):
        out["scores"] = row.get("scores", _MISSING)
        return out
    expected = "a list of ranks, one per response, each an integer >= 1 (1 = best)"
    if not isinstance(ranks, (list, tuple)):
        raise _fail("ranks", expected, ranks)
    if isinstance(out["responses"], (list, tuple)) and len(ranks) != len(out["responses"]):
        raise DataError(
            f"expected one rank per response ({len(out['responses'])}), got {len(ranks)}",
            field="ranks",
            reason="length mismatch",
        )
    for r in ranks:
        if not isinstance(r, numbers.Integral) or isinstance(r, (bool, np.bool_)) or r < 1 or r > 2**53:
            raise DataError(f"expected {expected}, got {_describe(r)}", field="ranks", reason="bad rank")
    out["scores"] = [-float(r) for r in ranks]
    return out


def _messages_sft(row: Mapping[str, Any]) -> dict[str, Any]:
    """TRL ``messages``: everything before the last assistant turn is the prompt, that turn the completion."""
    messages = _messages(row.get("messages", _MISSING), "messages")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(
            "expected a conversation of at least 2 messages ending with an assistant message, got "
            f"{len(messages)} message{'s' if len(messages) != 1 else ''} ending with role {messages[-1]['role']!r}",
            field="messages",
            reason="bad conversation",
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


class _Rows(NamedTuple):
    """Raw rows read from a source: ``items`` are ``(row, line or None, dict or DataError)``."""

    source: str
    items: list[tuple[int, int | None, Any]]
    columns: frozenset[str]

    def first(self, column: str) -> Any:
        """The first non-null value of a column, or None."""
        for _, _, row in self.items:
            if isinstance(row, Mapping) and row.get(column) is not None:
                return row[column]
        return None


@dataclass(frozen=True)
class SourceFormat:
    """One source schema: how to recognise its rows and turn each into a canonical record.

    Attributes:
        name: the name ``load(format=...)`` takes.
        kind: the canonical kind it produces (a key of :data:`KINDS`).
        requires: columns that must all be present for detection.
        normalise: source row -> canonical record (values are checked after, by kind).
        excludes: columns whose presence rules this schema out.
        probe: an extra detection test on the rows (e.g. the hh-rlhf ``"\\n\\nHuman:"`` marker).
        fields: canonical field -> source column, so errors name the column the user has.
    """

    name: str
    kind: str
    requires: frozenset[str]
    normalise: Callable[[Mapping[str, Any]], dict[str, Any]]
    excludes: frozenset[str] = frozenset()
    probe: Callable[[_Rows], bool] | None = None
    fields: Mapping[str, str] = field(default_factory=dict)

    def matches(self, rows: _Rows) -> bool:
        return (
            self.requires <= rows.columns
            and not (self.excludes & rows.columns)
            and (self.probe is None or self.probe(rows))
        )


def _fmt(
    name: str, kind: str, requires: str, normalise: Callable, excludes: str = "", **kw: Any
) -> SourceFormat:
    return SourceFormat(name, kind, frozenset(requires.split()), normalise, frozenset(excludes.split()), **kw)


def _is_hh(rows: _Rows) -> bool:
    first = rows.first("chosen")
    return isinstance(first, str) and "\n\nHuman:" in first


def _has_scores_or_ranks(rows: _Rows) -> bool:
    return bool({"scores", "ranks"} & rows.columns)


# Detection order: the first entry whose columns match wins, so specific schemas come before general ones.
FORMATS: dict[str, SourceFormat] = {f.name: f for f in [
    #    name                 kind         required columns           normaliser
    _fmt("hh_rlhf_cn",        "pairwise",  "context chosen rejected", _hh_rlhf_cn, fields={"prompt": "context"}),
    _fmt("listwise",          "listwise",  "prompt responses",        _listwise, probe=_has_scores_or_ranks),
    _fmt("pairwise",          "pairwise",  "prompt chosen rejected",  _columns("prompt chosen rejected")),
    _fmt("hh_rlhf",           "pairwise",  "chosen rejected",         _hh_rlhf, excludes="prompt", probe=_is_hh,
         fields={"prompt": "chosen"}),
    _fmt("pairwise_implicit", "pairwise",  "chosen rejected",         _implicit_prompt, excludes="prompt",
         fields={"prompt": "chosen"}),
    _fmt("unpaired",          "unpaired",  "prompt completion label", _columns("prompt completion label")),
    _fmt("pointwise",         "pointwise", "prompt completion score", _columns("prompt completion score")),
    _fmt("chatllama_reward",  "pointwise", "user_input completion score",
         _columns("prompt completion score", prompt="user_input"), fields={"prompt": "user_input"}),
    _fmt("chatllama_actor",   "sft",       "user_input completion",
         _columns("prompt completion", prompt="user_input"), fields={"prompt": "user_input"}),
    _fmt("chatllama_prompt",  "prompt",    "user_input",
         _columns("prompt", prompt="user_input"), fields={"prompt": "user_input"}),
    _fmt("messages",          "sft",       "messages",                _messages_sft,
         fields={"prompt": "messages", "completion": "messages"}),
    _fmt("sft",               "sft",       "prompt completion",       _columns("prompt completion")),
    _fmt("prompt",            "prompt",    "prompt",                  _columns("prompt")),
    _fmt("text",              "text",      "text",                    _columns("text")),
]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# reading sources


def _rows_from(source_name: str, items: list[tuple[int, int | None, Any]]) -> _Rows:
    columns: set[str] = set()
    for _, _, row in items:
        if isinstance(row, Mapping):
            columns.update(k for k in row if isinstance(k, str))
    return _Rows(source_name, items, frozenset(columns))


def _read_jsonl(lines: Iterable[bytes]) -> list[tuple[int, int | None, Any]]:
    """Parse JSON Lines; a broken line becomes a DataError item so it is reported (or dropped) in order."""
    items: list[tuple[int, int | None, Any]] = []
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        row = len(items)
        try:
            items.append((row, line_no, json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))))
        except UnicodeDecodeError as err:
            items.append(
                (row, line_no, DataError(f"invalid UTF-8 at byte {err.start}", reason="invalid JSON"))
            )
        except json.JSONDecodeError as err:
            items.append(
                (
                    row,
                    line_no,
                    DataError(f"invalid JSON: {err.msg} (column {err.colno})", reason="invalid JSON"),
                )
            )
    return items


def _read_json(path: str, split: str) -> list[tuple[int, int | None, Any]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"invalid UTF-8 at byte {err.start}", source=path, reason="invalid JSON") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved as .json, as datasets.load_dataset("json") accepts
            _check_single_split(path, split)
            return _read_jsonl(raw.splitlines())
        raise DataError(
            f"invalid JSON: {err.msg} (column {err.colno})",
            source=path,
            line=err.lineno,
            reason="invalid JSON",
        ) from None
    keyed = isinstance(data, dict)
    if keyed:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        key = split if isinstance(data.get(split), list) else lists[0] if len(lists) == 1 else None
        if key is not None and key != split and split != "train":  # e.g. {"train": [...]} asked for "test"
            raise DataError(f"split {split!r} not found; the JSON object has lists {sorted(lists)}", source=path)
        if key is None:
            raise DataError(
                f"expected a JSON array of rows, or an object holding one list of rows (or a list named "
                f"{split!r}), got an object with keys {sorted(data)}",
                source=path,
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON array of rows, got {_describe(data)}", source=path)
    if not keyed:
        _check_single_split(path, split)
    return [(i, None, row) for i, row in enumerate(data)]


def _check_single_split(path: str, split: str) -> None:
    """A file of one set of rows is the ``"train"`` split: asking it for another split (an evaluation split) is an
    error, not the training rows again."""
    if split != "train":
        raise DataError(
            f"split {split!r} not found: this file holds one set of rows, read as split 'train'; give the {split!r} "
            "rows in a file of their own (or a JSON object keyed by split)",
            source=path,
        )


def _read_parquet(path: str) -> list[tuple[int, int | None, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
        raise DataError(f"cannot read Parquet file: {err}", source=path) from None
    return [(i, None, row) for i, row in enumerate(table.to_pylist())]


_FILE_READERS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _read(source: Source, split: str) -> _Rows:
    if isinstance(source, DatasetDict):
        if split not in source:
            raise DataError(
                f"split {split!r} not found; the DatasetDict has {sorted(source)}", source="dataset"
            )
        return _read(source[split], split)._replace(source=f"dataset[{split!r}]")
    if isinstance(source, Dataset):
        return _rows_from("dataset", [(i, None, row) for i, row in enumerate(source.to_list())])
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        suffix = os.path.splitext(path)[1].lower()
        if os.path.isfile(path):
            reader = _FILE_READERS.get(suffix)
            if reader is None:
                raise ValueError(f"{path}: unsupported file type {suffix!r}; use {', '.join(_FILE_READERS)}")
            if reader != "json":
                _check_single_split(path, split)
            if reader == "jsonl":
                with open(path, "rb") as f:
                    return _rows_from(path, _read_jsonl(f))
            return _rows_from(path, _read_json(path, split) if reader == "json" else _read_parquet(path))
        if os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
        ):
            return _read(datasets.load_from_disk(path), split)._replace(source=path)
        if suffix in _FILE_READERS or isinstance(source, os.PathLike):
            raise FileNotFoundError(f"no such data file: {path}")
        # a Hub dataset name or a local folder of data files
        return _read(datasets.load_dataset(path, split=split), split)._replace(source=path)
    if isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        return _rows_from("rows", list(zip(range(len(source)), [None] * len(source), source)))
    raise TypeError(
        "load() takes a file path (.json, .jsonl, .parquet), a Hub dataset name, a datasets.Dataset or "
        f"DatasetDict, or a list of dicts; got {type(source).__name__}"
    )


# ---------------------------------------------------------------------------------------------------------
# detection, normalisation, validation


def _as_rows(rows: Dataset | Sequence[Mapping[str, Any]] | _Rows) -> _Rows:
    if isinstance(rows, _Rows):
        return rows
    return _read(rows, "train")


def _detect(rows: _Rows) -> SourceFormat:
    if not rows.items:
        raise DataError("expected at least one row, got none", source=rows.source, reason="no rows")
    for fmt in FORMATS.values():
        if fmt.matches(rows):
            return fmt
    known = "; ".join(f"{f.name} ({', '.join(sorted(f.requires))})" for f in FORMATS.values())
    raise DataError(
        f"cannot tell the schema from the columns {sorted(rows.columns)}; known schemas: {known}",
        source=rows.source,
        reason="unknown schema",
    )


def detect_format(rows: Dataset | Sequence[Mapping[str, Any]]) -> str:
    """Name of the source schema (a key of :data:`FORMATS`) that ``rows`` follow.

    Detection looks at the columns present in any row (and, for hh-rlhf, the ``"\\n\\nHuman:"`` marker in the
    first ``chosen`` value); it does not check values, :func:`load` does.

    >>> detect_format([{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "..."}])
    'hh_rlhf'
    >>> detect_format([{"prompt": "Hi", "responses": ["a", "b"], "ranks": [2, 1]}])
    'listwise'

    Raises:
        DataError: no rows, or no schema matches the columns (the message lists every schema's columns).
    """
    return _detect(_as_rows(rows)).name


def record_kind(dataset: Dataset | Iterable[str]) -> str:
    """The canonical kind of a dataset of canonical records, from its column names.

    >>> record_kind(["prompt", "chosen", "rejected", "margin"])
    'pairwise'
    >>> record_kind(Dataset.from_dict({"prompt": ["hi"], "completion": ["there"]}))
    'sft'

    Raises:
        DataError: the columns fit no kind of :data:`KINDS`.
    """
    columns = set(dataset.column_names if isinstance(dataset, Dataset) else dataset)
    for kind, required in KINDS.items():
        if set(required) <= columns:
            return kind
    kinds = "; ".join(f"{k} ({', '.join(c)})" for k, c in KINDS.items())
    raise DataError(
        f"expected the columns of a canonical kind ({kinds}), got {sorted(columns)}", reason="unknown kind"
    )


@dataclass
class ValidationReport:
    """What :func:`validate` (or ``load(drop_invalid=True)``) kept and dropped.

    Attributes:
        source: where the rows came from.
        format: the source schema used.
        kept: number of valid rows.
        dropped: reason -> number of rows dropped for it; a reason is ``"<field>: <category>"``
            (e.g. ``"chosen: empty text"``) or just the category when no field is involved.
        examples: the first error of each reason, with its row and field.
    """

    source: str
    format: str
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[DataError] = field(default_factory=list)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def add(self, err: DataError) -> None:
        reason = f"{err.field}: {err.reason}" if err.field else err.reason
        if reason not in self.dropped:
            self.examples.append(err)
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def __str__(self) -> str:
        total = self.kept + self.num_dropped
        text = f"{self.source}: kept {self.kept} of {total} rows ({self.format})"
        if self.dropped:
            text += f", dropped {self.num_dropped}: " + ", ".join(
                f"{n} x {r}" for r, n in self.dropped.items()
            )
            text += "; first: " + str(self.examples[0])
        return text


def _normalise(
    rows: _Rows, fmt: SourceFormat, drop_invalid: bool
) -> tuple[list[dict[str, Any]], ValidationReport]:
    check = _CHECKS[fmt.kind]
    optional = [c for c in _OPTIONAL.get(fmt.kind, ()) if c in rows.columns]
    report = ValidationReport(rows.source, fmt.name)
    records: list[dict[str, Any]] = []
    form, form_row = None, None
    for row_idx, line, raw in rows.items:
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, Mapping):
                raise DataError(
                    f"expected a row as a dict/JSON object, got {_describe(raw)}", reason="not an object"
                )
            if fmt.name != "text" and "text" in raw and not fmt.requires & raw.keys():
                raise DataError(
                    f"expected a row of the {fmt.name!r} schema (columns {', '.join(sorted(fmt.requires))}) like "
                    "the other rows, got a language-modeling row (a 'text' column); text rows cannot share a "
                    "dataset with another schema: give them in a dataset of their own",
                    field="text",
                    reason="mixed schemas",
                )
            rec = fmt.normalise(raw)
            rec.update({c: raw.get(c, _MISSING) for c in optional})
            rec = check(rec)
            if form is None:
                form, form_row = _record_form(rec), row_idx
            elif _record_form(rec) != form:
                raise DataError(
                    f"expected {_FORM_NAME[form]} like row {form_row}, got {_FORM_NAME[_record_form(rec)]}; "
                    "all rows must use the same form",
                    field="prompt",
                    reason="mixed text and messages",
                )
        except DataError as err:
            err.source, err.row, err.line = rows.source, row_idx, line
            if err.field is not None:
                err.field = fmt.fields.get(err.field, err.field)
            if not drop_invalid:
                raise
            report.add(err)
            continue
        records.append(rec)
    report.kept = len(records)
    return records, report


def _feature(form: str) -> Any:
    if form == "text":
        return Value("string")
    return List({"role": Value("string"), "content": Value("string")})


def _to_dataset(records: list[dict[str, Any]], kind: str, columns: Sequence[str], form: str) -> Dataset:
    text = _feature(form)
    types = {
        "prompt": text, "chosen": text, "rejected": text, "completion": text, "responses": List(text),
        "text": Value("string"),
        "margin": Value("float64"), "scores": List(Value("float64")), "score": Value("float64"), "label": Value("bool"),
    }  # fmt: skip
    cols = [*KINDS[kind], *(c for c in _OPTIONAL.get(kind, ()) if c in columns)]
    features = Features({c: types[c] for c in cols})
    return convert.dataset_from_columns({c: [r[c] for r in records] for c in cols}, features)


def _warn_ignored(rows: _Rows, fmt: SourceFormat) -> None:
    """Warn when a column that some schema uses is ignored: often a typo or a missing companion column."""
    known = {c for f in FORMATS.values() for c in f.requires} | {"scores", "ranks", "margin"}
    used = (
        set(fmt.requires)
        | set(_OPTIONAL.get(fmt.kind, ()))
        | ({"scores", "ranks"} if fmt.kind == "listwise" else set())
    )
    ignored = sorted((rows.columns & known) - used)
    if ignored:
        logger.warning("%s: read as %r; ignoring columns %s", rows.source, fmt.name, ignored)


def _resolve(rows: _Rows, format: str) -> SourceFormat:
    if format == "auto":
        fmt = _detect(rows)
        _warn_ignored(rows, fmt)
        return fmt
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of: {', '.join(FORMATS)}")
    if not rows.items:
        raise DataError("expected at least one row, got none", source=rows.source, reason="no rows")
    return FORMATS[format]


def validate(source: Source, format: str = "auto", *, split: str = "train") -> ValidationReport:
    """Check every row of ``source`` and report what :func:`load` would keep and drop, without raising on rows.

    >>> rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    ...         {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"},
    ...         {"prompt": "Hi", "chosen": None, "rejected": "Meh."}]
    >>> report = validate(rows)
    >>> report.kept, report.dropped
    (1, {'rejected: identical chosen and rejected': 1, 'chosen: null value': 1})
    >>> print(report.examples[1])
    rows: row 2, field 'chosen': expected non-empty text or list of messages, got None

    Raises:
        DataError: only for problems with the whole source (unreadable file, no rows, unknown schema).
    """
    rows = _read(source, split)
    return _normalise(rows, _resolve(rows, format), drop_invalid=True)[1]


def load(
    source: Source,
    format: str = "auto",
    *,
    split: str = "train",
    drop_invalid: bool = False,
    kind: str | None = None,
) -> Dataset:
    """Load data in any supported schema as a ``datasets.Dataset`` of canonical records.

    Args:
        source: a ``.json`` (array of rows, or an object holding a list of rows), ``.jsonl`` or ``.parquet``
            file path; a ``datasets.Dataset``; a ``DatasetDict`` (``split`` is taken); a list of dicts; a
            ``load_from_disk`` folder; or a Hub dataset name (read with ``datasets.load_dataset(source,
            split=split)``).
        format: ``"auto"`` to detect the source schema, or a key of :data:`FORMATS` to force one.
        split: the split to take from a ``DatasetDict``, the Hub or a JSON object keyed by split.
        drop_invalid: drop invalid rows (with a logged warning that counts them by reason) instead of
            raising on the first one; see :func:`validate` for the report.
        kind: the canonical kind the caller needs. Data of another kind is converted when there is a
            conversion (listwise/pointwise -> pairwise, pointwise/pairwise -> listwise, pairwise ->
            unpaired or sft, anything -> prompt); otherwise a ``DataError`` says what was found.

    Returns:
        A Dataset with exactly the columns of its kind (see :data:`KINDS`, plus ``margin`` for pairwise
        data that has one). ``prompt`` and completions are all text or all message lists
        ``[{"role", "content"}]``; scores and margins are float64, labels bool. Other columns are dropped.

    Raises:
        DataError: a row is invalid (naming source, row, JSON Lines line and field), there are no rows,
            or no schema matches.
        ValueError: unknown ``format`` or ``kind``.

    >>> ds = load([{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    >>> ds[0]
    {'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'}
    >>> load([{"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [2, 1, 3]}], kind="pairwise").to_list()
    [{'prompt': 'Q', 'chosen': 'b', 'rejected': 'a'}, {'prompt': 'Q', 'chosen': 'a', 'rejected': 'c'}, {'prompt': 'Q', 'chosen': 'b', 'rejected': 'c'}]
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}")
    rows = _read(source, split)
    fmt = _resolve(rows, format)
    records, report = _normalise(rows, fmt, drop_invalid)
    if report.dropped:
        logger.warning("%s", report)
    if not records:
        raise DataError(f"no valid rows left: {report}", source=rows.source, reason="no rows")
    dataset = _to_dataset(records, fmt.kind, sorted(rows.columns), _record_form(records[0]))
    return dataset if kind is None else convert_kind(dataset, kind)


# (from kind, to kind) -> conversion; "prompt" is reachable from every kind
_CONVERSIONS: dict[tuple[str, str], Callable[[Dataset], Dataset]] = {
    ("listwise", "pairwise"): convert.listwise_to_pairs,
    ("pointwise", "pairwise"): convert.pointwise_to_pairs,
    ("pointwise", "listwise"): convert.pointwise_to_listwise,
    ("pairwise", "listwise"): convert.pairs_to_listwise,
    ("pairwise", "unpaired"): convert.unpair,
    ("pairwise", "sft"): convert.pairs_to_sft,
}


def convert_kind(dataset: Dataset, kind: str) -> Dataset:
    """Convert canonical records to another kind with the default conversion, or fail clearly.

    ``listwise``/``pointwise`` -> ``pairwise`` use every pair of different scores; ``pairwise`` ->
    ``unpaired`` is :func:`~hfrlhf.data.convert.unpair`; ``pairwise`` -> ``sft`` keeps the chosen
    completion; every kind -> ``prompt`` keeps the distinct prompts.

    >>> ds = load([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    >>> list(convert_kind(ds, "unpaired")["label"])
    [True, False]
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}")
    have = record_kind(dataset)
    if have == kind:
        return dataset
    if have == "text":
        raise DataError(
            f"expected {kind} data, got text data (columns {dataset.column_names}): language-modeling rows (a lone "
            f"'text' column) have no prompt, completion or preference to learn from; {TEXT_TRAINERS} train on them",
            reason="text data",
        )
    if kind == "prompt":
        return convert.to_prompts(dataset)
    if (have, kind) not in _CONVERSIONS:
        options = [to for frm, to in _CONVERSIONS if frm == have] + ["prompt"] * (have != "prompt")
        raise DataError(
            f"expected {kind} data, got {have} data (columns {dataset.column_names}); {have} data converts "
            f"to: {', '.join(options) or 'nothing else'}",
            reason="wrong kind",
        )
    return _CONVERSIONS[have, kind](dataset)
