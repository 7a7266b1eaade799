"""Tokenization: canonical records -> token ids, with the prompt/completion boundary done right.

A prompt is rendered and tokenized once and shared by all of its completions. For chat data the prompt is
rendered with the generation prompt, exactly as it will be at generation time, and a completion is the text
the chat template writes after it. Prompt and completion text are tokenized separately, so
``prompt_ids + completion_ids`` is always what the model sees when it generates that completion from
``prompt_ids``, whatever the tokenizer merges across the boundary.

When the rendered prompt is not a prefix of the rendered conversation (templates that rewrite earlier turns
once an answer follows, or whose generation prompt differs from the header of a written assistant turn),
the completion is located in the rendered conversation from where its first message's content starts, and
everything the template writes from there on is kept.

Every completion ends with exactly one EOS: a template's own EOS is kept (not doubled) and only whitespace
after the final EOS (a trailing newline) is dropped; otherwise EOS is appended. Plain-text data gets no
special tokens besides that EOS.

Language-modeling records (a lone ``text``) are tokenized the same way as plain-text completions (no special
tokens, exactly one EOS at the end) and stored as SFT records whose prompt is their first token: every token
after it carries the loss. ``max_length`` keeps the start of a longer text (a cut text has no EOS).

Truncation: ``max_prompt_length`` keeps the *end* of a longer prompt (the question is usually last); then
every completion is cut to ``max_length - len(prompt_ids)`` tokens, keeping its start (a cut completion has
no EOS, and is flagged ``truncated``). All completions of a prompt share the same prompt ids and the same
budget. A prompt that leaves no room for a single completion token is a :class:`DataError`.

>>> from hfrlhf.models.tiny import build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> pair = tokenize_prompt_completion(tok, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])
>>> tok.decode(pair.prompt_ids), tok.decode(pair.completion_ids)
('<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n', 'hello<|im_end|>')
>>> tok.decode(tokenize_prompt_completion(tok, "Q: 2+2? A:", " 4").completion_ids)
' 4<|im_end|>'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from datasets import Dataset, Features, List, Value

from hfrlhf.data.errors import DataError
from hfrlhf.data.formats import _number, record_kind

Prompt = str | Sequence[Mapping[str, Any]]
Completion = str | Sequence[Mapping[str, Any]]

NO_ROOM = "prompt leaves no room for the completion"

# canonical kind -> its completion columns (text replaced by token ids); other columns are carried over
_COMPLETION_FIELDS: dict[str, tuple[str, ...]] = {
    "pairwise": ("chosen", "rejected"),
    "listwise": ("responses",),
    "unpaired": ("completion",),
    "pointwise": ("completion",),
    "sft": ("completion",),
    "prompt": (),
    "text": ("completion",),  # stored as an sft record: prompt_ids = the first token, completion_ids = the rest
}


def _text_columns(kind: str) -> tuple[str, ...]:
    """The columns of canonical records of ``kind`` that tokenization replaces by ids."""
    return ("text",) if kind == "text" else ("prompt", *_COMPLETION_FIELDS[kind])


class TokenizedPair(NamedTuple):
    """One prompt with one completion, as token ids (``completion_ids`` ends with EOS unless cut)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool


class TokenizedGroup(NamedTuple):
    """One prompt shared by several completions (``completions_ids[k]`` is completion ``k``)."""

    prompt_ids: list[int]
    completions_ids: list[list[int]]
    truncated: bool


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _check_form(value: Any, chat: bool, field: str) -> None:
    if chat and not (_is_chat(value) and len(value) > 0):
        raise DataError(
            f"expected a non-empty list of chat messages (the prompt is chat), got {type(value).__name__}",
            field=field,
        )
    if not chat and not isinstance(value, str):
        raise DataError(f"expected text (the prompt is text), got {type(value).__name__}", field=field)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool, field: str) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as err:  # e.g. raise_exception('Conversation roles must alternate user/assistant/...')
        raise DataError(
            f"the chat template refused the conversation ({', '.join(str(m.get('role')) for m in messages)}): {err}",
            field=field,
            reason="chat template error",
        ) from err
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_completion_text(
    tokenizer: Any,
    prompt: Sequence[Mapping[str, Any]],
    prompt_text: str,
    completion: Sequence[Mapping[str, Any]],
    field: str,
) -> str:
    """The text the template writes for ``completion`` after the rendered prompt."""
    full = _render(tokenizer, [*prompt, *completion], generation_prompt=False, field=field)
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    # The template does not render the prompt as a prefix of the conversation. Find where the first
    # completion message's content starts: render it with two different one-character contents; the
    # renderings agree up to that point.
    first, rest = dict(completion[0]), list(completion[1:])
    probe_a, probe_b = (
        _render(tokenizer, [*prompt, {**first, "content": c}, *rest], generation_prompt=False, field=field)
        for c in "AB"
    )
    start = _common_prefix_length(probe_a, probe_b)
    content = first.get("content")
    text = full[start:]
    if full[:start] != probe_a[:start] or (isinstance(content, str) and content.strip() not in text):
        raise DataError(
            "could not find where the completion starts in the rendered chat template: the rendered prompt "
            "is not a prefix of the rendered conversation and the assistant turn could not be located",
            field=field,
        )
    warnings.warn(
        "the chat template does not render the prompt (with the generation prompt) as a prefix of the full "
        "conversation; each completion is taken from where its content starts in the rendered conversation",
        stacklevel=3,
    )
    return text


def _end_with_single_eos(ids: list[int], eos_id: int, tokenizer: Any) -> list[int]:
    """``ids`` ending with exactly one EOS: whitespace after the last EOS is dropped, else EOS is appended."""
    if eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(eos_id)
        if tokenizer.decode(ids[last + 1 :]).strip() == "":
            ids = ids[: last + 1]
    while len(ids) >= 2 and ids[-1] == eos_id and ids[-2] == eos_id:
        ids = ids[:-1]
    if not ids or ids[-1] != eos_id:
        ids = [*ids, eos_id]
    return ids


def _prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    return _render(tokenizer, prompt, generation_prompt=True, field="prompt") if _is_chat(prompt) else prompt  # type: ignore[arg-type,return-value]


def tokenize_prompt_completions(
    tokenizer: Any,
    prompt: Prompt,
    completions: Sequence[Completion],
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    fields: Sequence[str] | None = None,
) -> TokenizedGroup:
    """Tokenize one prompt once and every completion that follows it (pairwise, listwise, KL pairs).

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token (and a chat template for chat data).
        prompt: text, or chat messages (the conversation so far).
        completions: zero or more completions in the same form as the prompt.
        max_length: cap on ``len(prompt_ids) + len(completion_ids)`` for every completion.
        max_prompt_length: keep at most this many prompt tokens, from the end.
        fields: column name of each completion, used in error messages (default ``"completion"``).

    Returns:
        :class:`TokenizedGroup`; ``truncated`` is True if the prompt or any completion was cut.

    Raises:
        DataError: a value of the wrong form, or a prompt that leaves no room for a completion token
            (``field="prompt"``, ``reason`` = ``NO_ROOM``); ``row`` and ``source`` are left for the caller.

    >>> from hfrlhf.models.tiny import build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> g = tokenize_prompt_completions(tok, " The the was", [" and", " the and was"], max_length=4, max_prompt_length=2)
    >>> tok.decode(g.prompt_ids), [tok.decode(c) for c in g.completions_ids], g.truncated
    (' the was', [' and<|im_end|>', ' the and'], True)
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set one before tokenizing")
    fields = list(fields) if fields is not None else ["completion"] * len(completions)
    chat = _is_chat(prompt)
    _check_form(prompt, chat, "prompt")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data is chat messages but the tokenizer has no chat template: set tokenizer.chat_template "
            "(or load a chat model's tokenizer), or give prompts and completions as plain text",
            field="prompt", reason="no chat template",
        )
    prompt_text = _prompt_text(tokenizer, prompt)
    prompt_ids = _encode(tokenizer, prompt_text)
    completions_ids = []
    for completion, field in zip(completions, fields):
        _check_form(completion, chat, field)
        if chat:
            text = _chat_completion_text(tokenizer, prompt, prompt_text, completion, field)  # type: ignore[arg-type]
        else:
            text = completion  # type: ignore[assignment]
        completions_ids.append(_end_with_single_eos(_encode(tokenizer, text), eos_id, tokenizer))  # type: ignore[arg-type]

    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
        truncated = True
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room for a completion within "
                f"max_length={max_length}; set max_prompt_length below max_length, or drop such rows",
                field="prompt",
                reason=NO_ROOM,
            )
        if any(len(c) > room for c in completions_ids):
            completions_ids = [c[:room] for c in completions_ids]
            truncated = True
    return TokenizedGroup(prompt_ids, completions_ids, truncated)


def tokenize_prompt_completion(
    tokenizer: Any,
    prompt: Prompt,
    completion: Completion,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> TokenizedPair:
    """Tokenize one prompt and one completion (see the module docstring for the rules).

    >>> from hfrlhf.models.tiny import build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> pair = tokenize_prompt_completion(tok, " The was", " the and the", max_length=4)
    >>> tok.decode(pair.prompt_ids), tok.decode(pair.completion_ids), pair.truncated
    (' The was', ' the and', True)
    """
    group = tokenize_prompt_completions(
        tokenizer, prompt, [completion], max_length=max_length, max_prompt_length=max_prompt_length
    )
    return TokenizedPair(group.prompt_ids, group.completions_ids[0], group.truncated)


def tokenize_text(tokenizer: Any, text: str, *, max_length: int | None = None) -> TokenizedPair:
    """Tokenize one language-modeling text: every token but the first (which has no predecessor) is trained on.

    The text is tokenized as a plain-text completion is: no special tokens (no BOS), exactly one EOS at the end
    (kept if the text already ends with it, appended otherwise). ``max_length`` keeps the first ``max_length``
    tokens (the cut text has no EOS). The result is split after the first token, so the tokenized record is an
    sft record whose completion is the rest of the text.

    Raises:
        DataError: ``text`` is not a string (``field="text"``).
        ValueError: ``max_length`` below 2 (nothing left to train on), or a tokenizer without an EOS token.

    >>> from hfrlhf.models.tiny import build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> pair = tokenize_text(tok, " The was the")
    >>> tok.decode(pair.prompt_ids), tok.decode(pair.completion_ids), pair.truncated
    (' The', ' was the<|im_end|>', False)
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set one before tokenizing")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not isinstance(text, str):
        raise DataError(f"expected text, got {type(text).__name__}", field="text")
    ids = _end_with_single_eos(_encode(tokenizer, text), eos_id, tokenizer)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    return TokenizedPair(ids[:1], ids[1:], truncated)


def _output_features(kind: str, features: Features, passthrough: list[str]) -> Features:
    ids = List(Value("int32"))
    out = {name: features[name] for name in passthrough}
    out["prompt_ids"] = ids
    if kind == "listwise":
        out["responses_ids"] = List(ids)
    else:
        for field in _COMPLETION_FIELDS[kind]:
            out[f"{field}_ids"] = ids
    out["num_prompt_tokens"] = Value("int32")
    many = kind in ("pairwise", "listwise")
    out["num_completion_tokens"] = List(Value("int32")) if many else Value("int32")
    out["truncated"] = Value("bool")
    return Features(out)


def _tokenize_rows(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    tokenizer: Any,
    kind: str,
    passthrough: list[str],
    max_length: int | None,
    max_prompt_length: int | None,
    drop_invalid: bool,
    source: str,
) -> dict[str, list[Any]]:
    fields = _COMPLETION_FIELDS[kind]
    out: dict[str, list[Any]] = {name: [] for name in passthrough}
    id_columns = ["responses_ids"] if kind == "listwise" else [f"{f}_ids" for f in fields]
    for name in ["prompt_ids", *id_columns, "num_prompt_tokens", "num_completion_tokens", "truncated"]:
        out[name] = []
    for i, row_index in enumerate(indices):
        if kind == "listwise":
            completions = list(batch["responses"][i])
            names = ["responses"] * len(completions)
        elif kind != "text":
            completions = [batch[f][i] for f in fields]
            names = list(fields)
        try:
            if kind == "text":
                pair = tokenize_text(tokenizer, batch["text"][i], max_length=max_length)
                group = TokenizedGroup(pair.prompt_ids, [pair.completion_ids], pair.truncated)
            else:
                group = tokenize_prompt_completions(
                    tokenizer,
                    batch["prompt"][i],
                    completions,
                    max_length=max_length,
                    max_prompt_length=max_prompt_length,
                    fields=names,
                )
        except DataError as err:
            if drop_invalid and err.reason == NO_ROOM:
                continue
            err.row, err.source = row_index, source
            raise
        for name in passthrough:
            out[name].append(batch[name][i])
        out["prompt_ids"].append(group.prompt_ids)
        if kind == "listwise":
            out["responses_ids"].append(group.completions_ids)
        else:
            for name, ids in zip(id_columns, group.completions_ids):
                out[name].append(ids)
        lengths = [len(c) for c in group.completions_ids]
        out["num_prompt_tokens"].append(len(group.prompt_ids))
        out["num_completion_tokens"].append(lengths if kind in ("pairwise", "listwise") else sum(lengths))
        out["truncated"].append(group.truncated)
    return out


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: Any,
    *,
    kind: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    drop_invalid: bool = False,
    num_proc: int | None = None,
    source: str | None = None,
    desc: str | None = None,
) -> Dataset:
    """Tokenize a dataset of canonical records into the tokenized columns of ``docs/architecture.md``.

    The text columns (``prompt`` and the completions) are replaced by ``*_ids`` columns; scores, labels,
    margins and any other column are carried over. Every kind also gets ``num_prompt_tokens``,
    ``num_completion_tokens`` (a list for pairwise and listwise, 0 for prompt-only data) and ``truncated``.

    Args:
        dataset: canonical records of one kind (``pairwise``, ``listwise``, ``unpaired``, ``pointwise``,
            ``sft``, ``prompt`` or ``text``; ``text`` records come out as ``sft`` ones, see :func:`tokenize_text`).
        tokenizer: a Hugging Face tokenizer with an EOS token (and a chat template for chat data).
        kind: the record kind; found from the column names (``formats.record_kind``) when None.
        max_length: cap on prompt + completion tokens.
        max_prompt_length: keep at most this many prompt tokens, from the end.
        drop_invalid: drop rows whose prompt leaves no room for a completion (with a warning saying how
            many) instead of raising.
        num_proc: worker processes for ``Dataset.map``.
        source: where the data came from, for error messages (default: the dataset's name, or "dataset").
        desc: progress-bar label.

    Raises:
        DataError: naming the source, the row and the field of the first bad row.

    >>> from hfrlhf.models.tiny import build_tiny_tokenizer
    >>> rows = Dataset.from_list([{"prompt": " The", "chosen": " was", "rejected": " the and"}])
    >>> out = tokenize_dataset(rows, build_tiny_tokenizer())
    >>> out.column_names
    ['prompt_ids', 'chosen_ids', 'rejected_ids', 'num_prompt_tokens', 'num_completion_tokens', 'truncated']
    >>> out[0]["num_completion_tokens"], out[0]["truncated"]
    ([2, 3], False)
    """
    kind = kind or record_kind(dataset)
    if kind not in _COMPLETION_FIELDS:
        raise ValueError(f"kind must be one of {sorted(_COMPLETION_FIELDS)}, got {kind!r}")
    missing = [c for c in _text_columns(kind) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{kind} records need columns {missing}; got {dataset.column_names}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}) to leave room "
            "for the completion"
        )
    source = source or dataset.info.dataset_name or "dataset"
    text_columns = set(_text_columns(kind))
    passthrough = [c for c in dataset.column_names if c not in text_columns]
    passthrough = [c for c in passthrough if c not in ("num_prompt_tokens", "num_completion_tokens", "truncated")]
    before = len(dataset)
    out = dataset.map(
        _tokenize_rows,
        fn_kwargs={
            "tokenizer": tokenizer,
            "kind": kind,
            "passthrough": passthrough,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "drop_invalid": drop_invalid,
            "source": source,
        },
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=_output_features(kind, dataset.features, passthrough),
        num_proc=num_proc,
        desc=desc or f"Tokenizing {kind} records",
    )
    dropped = before - len(out)
    if dropped:
        warnings.warn(
            f"dropped {dropped} of {before} rows from {source}: the prompt left no room for a completion "
            f"within max_length={max_length} (max_prompt_length={max_prompt_length})",
            stacklevel=2,
        )
    return out


def _id_columns(kind: str) -> list[str]:
    return ["prompt_ids"] + (["responses_ids"] if kind == "listwise" else [f"{f}_ids" for f in _COMPLETION_FIELDS[kind]])


# kind -> the value columns its tokenized records need besides the ids
_VALUE_COLUMNS: dict[str, tuple[str, ...]] = {"listwise": ("scores",), "pointwise": ("score",), "unpaired": ("label",)}


def check_tokenized(
    dataset: Dataset, vocab_size: int, *, source: str | None = None, kinds: Sequence[str] | None = None
) -> None:
    """Check already tokenized records before they reach a model: every id column present, each sequence a
    non-empty list of ints in ``[0, vocab_size)``, scores and margins finite numbers. A bad value would otherwise
    fail inside the forward pass (an embedding index error) far from the row that caused it, or give a NaN loss.

    ``kinds``: the record kinds the caller trains on (e.g. ``("pairwise",)``); the records must have the columns
    of one of them (ids, and ``scores`` / ``score`` / ``label`` where the kind has one). Without it the kind is
    read from the id columns present.

    Raises:
        DataError: naming the source, the row and the column of the first bad value.

    >>> rows = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 900]}])
    >>> check_tokenized(rows, vocab_size=320)
    Traceback (most recent call last):
    ...
    hfrlhf.data.errors.DataError: dataset: row 0, field 'rejected_ids': token id 900 is outside the vocabulary (0..319)
    """
    source = source or dataset.info.dataset_name or "dataset"
    if "prompt_ids" not in dataset.column_names:
        raise DataError(f"tokenized records need a 'prompt_ids' column; got {dataset.column_names}", source=source)
    if kinds:
        needed = {k: [*_id_columns(k), *_VALUE_COLUMNS.get(k, ())] for k in kinds}
        kind = next((k for k, cols in needed.items() if all(c in dataset.column_names for c in cols)), None)
        if kind is None:
            missing = [c for c in needed[kinds[0]] if c not in dataset.column_names]
            raise DataError(f"tokenized {kinds[0]} records need the columns {missing}; got {dataset.column_names}",
                            source=source, field=missing[0], reason="missing column")
    else:
        kind = next((k for k in ("pairwise", "listwise", "unpaired", "sft") if all(
            c in dataset.column_names for c in _id_columns(k))), "prompt")
    columns = [c for c in _id_columns(kind) if c in dataset.column_names]
    for column in columns:
        nested = column == "responses_ids"
        if _ids_look_valid(dataset, column, vocab_size, nested):
            continue
        for row, value in enumerate(dataset[column]):
            sequences = value if nested and isinstance(value, list) else [value]
            if nested and (not isinstance(value, list) or len(value) < 2):
                raise DataError("expected a list of at least 2 token-id lists", source=source, row=row, field=column)
            for ids in sequences:
                problem = _ids_problem(ids, vocab_size)
                if problem:
                    raise DataError(problem, source=source, row=row, field=column, reason=problem.split(":")[0])
    for column in ("scores", "score", "margin"):
        if column not in dataset.column_names:
            continue
        for row, value in enumerate(dataset[column]):
            try:
                if column != "scores":
                    _number(value, column)
                elif isinstance(value, list):
                    for x in value:
                        _number(x, column)
                else:
                    raise DataError(f"expected a list of scores, got {value!r:.40}", field=column)
            except DataError as err:
                err.source, err.row = source, row
                raise


def _ids_look_valid(dataset: Dataset, column: str, vocab_size: int, nested: bool) -> bool:
    """Fast path over the Arrow column: integer ids in range, no empty list and no null. False means "look
    row by row" (it also covers types this check does not know)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        col = dataset.data.table.column(column).combine_chunks() if hasattr(dataset.data, "table") else None
        if col is None:
            return False
        if len(dataset) != len(col):  # an indices mapping (select/shuffle) is in place: go row by row
            return False
        levels = [col]
        if nested:
            if col.null_count or pc.min(pc.list_value_length(col)).as_py() < 2:
                return False
            levels.append(pc.list_flatten(col))
        inner = levels[-1]
        if not pa.types.is_list(inner.type) and not pa.types.is_large_list(inner.type):
            return False
        if inner.null_count or pc.min(pc.list_value_length(inner)).as_py() < 1:
            return False
        ids = pc.list_flatten(inner)
        if not pa.types.is_integer(ids.type) or ids.null_count:
            return False
        bounds = pc.min_max(ids).as_py()
        return bounds["min"] >= 0 and bounds["max"] < vocab_size
    except (pa.ArrowException, AttributeError, KeyError, TypeError):
        return False


def _ids_problem(ids: Any, vocab_size: int) -> str | None:
    if not isinstance(ids, list) or not ids:
        return f"expected a non-empty list of token ids, got {ids!r:.40}"
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool):
            return f"expected integer token ids, got {t!r:.40}"
        if not 0 <= t < vocab_size:
            return f"token id {t} is outside the vocabulary (0..{vocab_size - 1})"
    return None
