"""Collators: tokenized records -> tensors, in one of three layouts, with one index scheme.

Every collator turns a list of tokenized records (see ``hfrlhf.data.tokenize``) into *sequences*, each a
list of :class:`Segment` (a prompt segment that is not scored, then a completion segment that is), and
hands them to :func:`build_batch`, the only place that knows about layouts:

- ``"padded"``: one row per sequence, padded on the right (or left) with ``pad_token_id``; 2D
  ``attention_mask`` built from the lengths (never from ``input_ids != pad_token_id``: pad is often EOS).
- ``"packed"``: sequences concatenated into as few rows as fit (first-fit decreasing), ``position_ids``
  restarting at 0 for each sequence and a 4D block-diagonal causal additive mask ``(R, 1, T, T)``.
- ``"shared_prompt"``: one row per prompt holding the prompt once and then each of its completions; every
  completion attends causally to the prompt and to itself only, and its positions continue from the end of
  the prompt, so each completion sees exactly what it would see in its own padded row.

Whatever the layout, scored tokens are found through three flat index tensors into ``R * T``
(``pred_index``, ``target_index``, ``target_seq``) and ``last_index`` gives each sequence's final token, so
log-probs computed through them are the same numbers for every layout.

The 4D masks hold 0 where attention is allowed and ``torch.finfo(mask_dtype).min`` elsewhere, and every pad
token attends to itself. No query row is ever fully masked, so neither ``sdpa`` nor ``eager`` attention
produces NaN on pad rows, even if the mask is later cast to a dtype where that minimum becomes ``-inf``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

Layout = Literal["padded", "packed", "shared_prompt"]
LAYOUTS: tuple[str, ...] = ("padded", "packed", "shared_prompt")
INDEX_KEYS: tuple[str, ...] = ("pred_index", "target_index", "target_seq", "last_index")


class Segment(NamedTuple):
    """A run of token ids inside a sequence; ``scored`` tokens get an entry in the index tensors."""

    ids: Sequence[int]
    scored: bool


@dataclass
class _Unit:
    """Tokens laid out contiguously in one row: one sequence, or a shared prefix plus several completions."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]  # the sequence a token belongs to, or -1 for a prefix shared by every member
    members: list[tuple[int, list[int], list[bool]]]  # (sequence index, columns in logical order, scored)


def _expand_unit(sequences: Sequence[Sequence[Segment]], seq_ids: list[int], share_first: bool) -> _Unit:
    tokens: list[int] = []
    positions: list[int] = []
    branches: list[int] = []
    members: list[tuple[int, list[int], list[bool]]] = []
    prefix_cols: list[int] = []
    prefix_scored: list[bool] = []
    if share_first:
        first = list(sequences[seq_ids[0]][0].ids)
        for s in seq_ids[1:]:
            if list(sequences[s][0].ids) != first:
                raise ValueError(f"sequences {seq_ids} share a row but their first segments differ")
        tokens.extend(first)
        positions.extend(range(len(first)))
        branches.extend([-1] * len(first))
        prefix_cols = list(range(len(first)))
        prefix_scored = [sequences[seq_ids[0]][0].scored] * len(first)
    for s in seq_ids:
        segments = sequences[s][1:] if share_first else sequences[s]
        cols, scored = list(prefix_cols), list(prefix_scored)
        for seg in segments:
            n = len(seg.ids)
            cols.extend(range(len(tokens), len(tokens) + n))
            positions.extend(range(len(scored), len(scored) + n))
            tokens.extend(int(t) for t in seg.ids)
            branches.extend([s] * n)
            scored.extend([seg.scored] * n)
        if not cols:
            raise ValueError(f"sequence {s} has no tokens")
        members.append((s, cols, scored))
    return _Unit(tokens, positions, branches, members)


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of unit indices, each of total length <= capacity; longest units placed first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b in range(len(bins)):
            if lengths[i] <= room[b]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    # keep units inside a row in their input order, so a row reads sequence by sequence
    return [sorted(b) for b in bins]


def build_batch(
    sequences: Sequence[Sequence[Segment]],
    pad_token_id: int,
    *,
    layout: Layout = "padded",
    groups: Sequence[int] | None = None,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
    max_tokens_per_row: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Lay out ``S`` sequences in rows and compute the index tensors shared by every layout.

    Args:
        sequences: ``S`` sequences, each a list of segments; sequence ``s`` gets number ``s``.
        pad_token_id: id written into padding positions (masked out, never scored).
        layout: ``"padded"``, ``"packed"`` or ``"shared_prompt"`` (see the module docstring).
        groups: for ``"shared_prompt"``, the row group of each sequence (length ``S``); sequences of a group
            must have the same first segment, which is laid out once. Default: every sequence alone.
        padding_side: ``"right"`` or ``"left"``; only the padded layout can pad on the left.
        pad_to_multiple_of: round ``T`` up to a multiple of this.
        max_tokens_per_row: row capacity for ``"packed"`` (default: the longest sequence). Given for
            ``"shared_prompt"``, its units (a prompt with its completions) are packed first-fit into rows of
            this capacity instead of one unit per row: less padding, one longer attention per row.
        mask_dtype: float dtype of the 4D additive mask.

    Returns:
        ``input_ids`` ``(R, T)``; ``attention_mask`` ``(R, T)`` long (padded) or ``(R, 1, T, T)``
        ``mask_dtype`` (packed, shared_prompt); ``position_ids`` ``(R, T)``; ``pred_index``, ``target_index``,
        ``target_seq`` ``(N,)``; ``last_index`` ``(S,)``; for packed and shared_prompt also
        ``attention_blocks`` ``(K, 5)``, the mask's causal blocks (``hfrlhf.ops.block_attention``). Scored tokens are ordered by sequence, then by
        position in the sequence, whatever the layout. The first token of a sequence has no predecessor and
        is never scored.

    >>> seqs = [[Segment([5, 6], False), Segment([7, 2], True)], [Segment([5, 6], False), Segment([8], True)]]
    >>> b = build_batch(seqs, pad_token_id=0)
    >>> b["input_ids"], b["attention_mask"]
    (tensor([[5, 6, 7, 2],
            [5, 6, 8, 0]]), tensor([[1, 1, 1, 1],
            [1, 1, 1, 0]]))
    >>> b["target_index"], b["pred_index"], b["target_seq"], b["last_index"]
    (tensor([2, 3, 6]), tensor([1, 2, 5]), tensor([0, 0, 1]), tensor([3, 6]))
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if padding_side == "left" and layout != "padded":
        raise ValueError(f"only the padded layout can pad on the left (layout={layout!r})")
    if not sequences:
        raise ValueError("cannot build a batch of zero sequences")
    num_seqs = len(sequences)

    # 1. units: what must sit contiguously in one row
    if layout == "shared_prompt" and groups is not None:
        if len(groups) != num_seqs:
            raise ValueError(f"groups has {len(groups)} entries for {num_seqs} sequences")
        by_group: dict[int, list[int]] = {}
        for s, g in enumerate(groups):
            by_group.setdefault(int(g), []).append(s)
        units = [_expand_unit(sequences, members, share_first=True) for members in by_group.values()]
    else:
        units = [_expand_unit(sequences, [s], share_first=False) for s in range(num_seqs)]

    # 2. rows: one unit per row, or first-fit packing for "packed" (and "shared_prompt" given a row capacity)
    lengths = [len(u.tokens) for u in units]
    if layout == "packed" or (layout == "shared_prompt" and max_tokens_per_row is not None):
        capacity = max(lengths) if max_tokens_per_row is None else max_tokens_per_row
        if max(lengths) > capacity:
            what = "a sequence" if layout == "packed" else "a prompt with its completions"
            raise ValueError(f"{what} of {max(lengths)} tokens does not fit max_tokens_per_row={capacity}")
        rows = _first_fit_decreasing(lengths, capacity)
    else:
        rows = [[i] for i in range(len(units))]
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    num_rows, width = len(rows), max(row_lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    # 3. fill the rows; for the 4D mask, tag every column with its unit and branch
    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    # a pad column is its own unit and branch, so it attends to itself only
    unit_of = -1 - torch.arange(width).expand(num_rows, width).clone()
    branch_of = torch.full((num_rows, width), -2, dtype=torch.long)
    flat_cols: list[torch.Tensor | None] = [None] * num_seqs  # flat index of each sequence's tokens
    blocks: list[tuple[int, int, int, int, int]] = []
    scored_flags: list[list[bool]] = [[] for _ in range(num_seqs)]
    for r, row in enumerate(rows):
        start = width - row_lengths[r] if padding_side == "left" else 0
        for i in row:
            unit = units[i]
            n = len(unit.tokens)
            input_ids[r, start : start + n] = torch.tensor(unit.tokens, dtype=torch.long)
            position_ids[r, start : start + n] = torch.tensor(unit.positions, dtype=torch.long)
            unit_of[r, start : start + n] = i
            branch_of[r, start : start + n] = torch.tensor(unit.branches, dtype=torch.long)
            for s, cols, scored in unit.members:
                flat_cols[s] = torch.tensor(cols, dtype=torch.long) + start + r * width
                scored_flags[s] = scored
            blocks.extend(_unit_blocks(unit.branches, r, start))
            start += n

    if layout != "padded":
        # query q may see key k: same unit, k not after q, and k on q's branch or on the shared prefix.
        # Within a unit the prefix comes first and completions follow one another, so this is causal
        # attention to the prefix and to the own completion, never to a sibling. No row is fully masked.
        cols = torch.arange(width)
        allowed = (
            (unit_of[:, :, None] == unit_of[:, None, :])
            & (cols[None, None, :] <= cols[None, :, None])
            & ((branch_of[:, :, None] == branch_of[:, None, :]) | (branch_of[:, None, :] == -1))
        )  # (R, T, T) [query, key]
        attention_mask = torch.zeros((num_rows, 1, width, width), dtype=mask_dtype)
        attention_mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    else:
        attention_mask = torch.zeros((num_rows, width), dtype=torch.long)
        for r in range(num_rows):
            if padding_side == "left":
                attention_mask[r, width - row_lengths[r] :] = 1
            else:
                attention_mask[r, : row_lengths[r]] = 1

    # 4. index tensors: scored token j of a sequence is predicted by its token j - 1 in logical order
    pred, target, seq, last = [], [], [], []
    for s in range(num_seqs):
        cols_t = flat_cols[s]
        assert cols_t is not None
        is_scored = torch.tensor(scored_flags[s], dtype=torch.bool)
        is_scored[0] = False
        j = is_scored.nonzero().squeeze(-1)
        target.append(cols_t[j])
        pred.append(cols_t[j - 1])
        seq.append(torch.full((len(j),), s, dtype=torch.long))
        last.append(cols_t[-1:])
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pred_index": torch.cat(pred),
        "target_index": torch.cat(target),
        "target_seq": torch.cat(seq),
        "last_index": torch.cat(last),
    }
    if layout != "padded":
        out["attention_blocks"] = torch.tensor(blocks, dtype=torch.long).reshape(-1, 5)
    return out


def _unit_blocks(branches: Sequence[int], row: int, start: int) -> list[tuple[int, int, int, int, int]]:
    """The causal blocks of a unit laid out from column ``start``: ``(row, q_start, q_end, prefix_start,
    prefix_end)`` (see ``hfrlhf.ops.block_attention``). The shared prefix and the first completion form one
    causal span; every further completion attends to the prefix and causally to itself."""
    prefix = 0
    while prefix < len(branches) and branches[prefix] == -1:
        prefix += 1
    runs: list[list[int]] = []  # [first column, end column] of each completion, in order
    for col in range(prefix, len(branches)):
        if runs and branches[col] == branches[col - 1]:
            runs[-1][1] = col + 1
        else:
            runs.append([col, col + 1])
    if not runs:
        return [(row, start, start + prefix, start, start)]
    out = [(row, start, start + runs[0][1], start, start)]
    out += [(row, start + a, start + b, start, start + prefix) for a, b in runs[1:]]
    return out


def _ids(feature: Mapping[str, Any], key: str) -> list[int]:
    value = feature[key]
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _prompt_completion(prompt: Sequence[int], completion: Sequence[int]) -> list[Segment]:
    return [Segment(prompt, False), Segment(completion, True)]


class _LayoutCollator:
    """Holds the layout options every collator shares and hands sequences to :func:`build_batch`."""

    allowed_layouts: tuple[str, ...] = LAYOUTS

    def __init__(
        self,
        pad_token_id: int,
        *,
        layout: Layout = "padded",
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        max_tokens_per_row: int | None = None,
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set tokenizer.pad_token, e.g. to the EOS token)")
        if layout not in self.allowed_layouts:
            raise ValueError(f"{type(self).__name__} supports layouts {self.allowed_layouts}, got {layout!r}")
        if padding_side == "left" and layout != "padded":
            raise ValueError(f"only the padded layout can pad on the left (layout={layout!r})")
        self.pad_token_id = int(pad_token_id)
        self.layout = layout
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.max_tokens_per_row = max_tokens_per_row
        self.mask_dtype = mask_dtype

    def _build(
        self, sequences: Sequence[Sequence[Segment]], groups: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        return build_batch(
            sequences,
            self.pad_token_id,
            layout=self.layout,
            groups=groups,
            padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
            max_tokens_per_row=self.max_tokens_per_row,
            mask_dtype=self.mask_dtype,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad_token_id={self.pad_token_id}, layout={self.layout!r})"


class PairwiseCollator(_LayoutCollator):
    """Pairwise preference records -> one batch of ``S = 2B`` sequences: chosen_0..B-1, rejected_0..B-1.

    Reads ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and, when every record has it, ``margin``.
    In the shared-prompt layout row ``i`` is ``prompt_i + chosen_i + rejected_i``.

    Returns the :func:`build_batch` keys (``R = 2B`` rows when padded, ``B`` when shared_prompt, as few as
    fit when packed) plus ``margin`` ``(B,)`` float when present.

    >>> batch = PairwiseCollator(pad_token_id=0)([{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}])
    >>> batch["input_ids"], batch["attention_mask"]
    (tensor([[5, 6, 7, 2, 0],
            [5, 6, 8, 9, 2]]), tensor([[1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1]]))
    >>> batch["target_seq"], batch["last_index"]
    (tensor([0, 0, 1, 1, 1]), tensor([3, 9]))
    >>> shared = PairwiseCollator(pad_token_id=0, layout="shared_prompt")([{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}])
    >>> shared["input_ids"], shared["position_ids"], shared["attention_mask"].shape
    (tensor([[5, 6, 7, 2, 8, 9, 2]]), tensor([[0, 1, 2, 3, 2, 3, 4]]), torch.Size([1, 1, 7, 7]))
    >>> shared["pred_index"], shared["target_index"]  # rejected's first token is predicted from position 1
    (tensor([1, 2, 1, 4, 5]), tensor([2, 3, 4, 5, 6]))
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        prompts = [_ids(f, "prompt_ids") for f in features]
        sequences = [_prompt_completion(p, _ids(f, "chosen_ids")) for p, f in zip(prompts, features)]
        sequences += [_prompt_completion(p, _ids(f, "rejected_ids")) for p, f in zip(prompts, features)]
        batch = self._build(sequences, groups=list(range(n)) * 2)
        has_margin = ["margin" in f and f["margin"] is not None for f in features]
        if any(has_margin):
            if not all(has_margin):
                raise ValueError("some records have a margin and some do not")
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float32)
        return batch


class ListwiseCollator(_LayoutCollator):
    """Listwise records (a prompt with K >= 2 scored responses, K may differ) -> one batch.

    Sequences are numbered prompt-major: prompt 0's responses first, then prompt 1's, and so on.
    Reads ``prompt_ids``, ``responses_ids`` (list of lists) and ``scores``. In the shared-prompt layout a row
    holds one prompt followed by all its responses.

    Returns the :func:`build_batch` keys plus ``scores`` ``(P, Kmax)`` float (0 in missing slots),
    ``response_mask`` ``(P, Kmax)`` bool and ``response_seq`` ``(P, Kmax)`` long (-1 in missing slots).

    >>> feats = [{"prompt_ids": [5], "responses_ids": [[6, 2], [7, 2], [8, 2]], "scores": [1.0, 0.0, 2.0]},
    ...          {"prompt_ids": [9, 9], "responses_ids": [[6, 2], [2]], "scores": [0.5, 0.0]}]
    >>> batch = ListwiseCollator(pad_token_id=0)(feats)
    >>> batch["input_ids"].shape, batch["response_seq"], batch["response_mask"]
    (torch.Size([5, 4]), tensor([[ 0,  1,  2],
            [ 3,  4, -1]]), tensor([[ True,  True,  True],
            [ True,  True, False]]))
    >>> batch["scores"]
    tensor([[1.0000, 0.0000, 2.0000],
            [0.5000, 0.0000, 0.0000]])
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        sequences: list[list[Segment]] = []
        groups: list[int] = []
        counts = [len(f["responses_ids"]) for f in features]
        k_max = max(counts)
        scores = torch.zeros((len(features), k_max), dtype=torch.float32)
        response_seq = torch.full((len(features), k_max), -1, dtype=torch.long)
        for p, f in enumerate(features):
            prompt = _ids(f, "prompt_ids")
            if len(f["scores"]) != counts[p]:
                raise ValueError(f"record {p} has {counts[p]} responses but {len(f['scores'])} scores")
            for k, response in enumerate(f["responses_ids"]):
                response_seq[p, k] = len(sequences)
                scores[p, k] = float(f["scores"][k])
                sequences.append(_prompt_completion(prompt, list(response)))
                groups.append(p)
        batch = self._build(sequences, groups=groups)
        batch["scores"] = scores
        batch["response_mask"] = response_seq >= 0
        batch["response_seq"] = response_seq
        return batch


class UnpairedCollator(_LayoutCollator):
    """Unpaired (KTO-style) records -> ``S = B`` sequences, or ``S = 2B`` with ``kl_pairs=True``.

    Reads ``prompt_ids``, ``completion_ids`` and ``label`` (True = desirable). With ``kl_pairs``, sequence
    ``B + i`` is prompt ``i`` followed by completion ``(i + 1) mod B``: the mismatched pairs from which KTO
    estimates its reference point. In the shared-prompt layout sequence ``i`` and ``B + i`` share a row.

    With ``B == 1`` the only prompt is paired with its own completion, so ``S = 2B`` holds for every batch
    and the KL estimate stays a finite number; it then equals the sample's own log-ratio, which is a poor
    reference point, so KTO trainers should use a per-device batch size above 1 (TRL requires the same).
    Mismatched pairs are not truncated: a long prompt with another record's long completion may exceed
    the ``max_length`` the records were tokenized with.

    Returns the :func:`build_batch` keys plus ``labels`` ``(B,)`` bool.

    >>> feats = [{"prompt_ids": [5], "completion_ids": [6, 2], "label": True},
    ...          {"prompt_ids": [7, 7], "completion_ids": [2], "label": False}]
    >>> batch = UnpairedCollator(pad_token_id=0, kl_pairs=True)(feats)
    >>> batch["input_ids"]
    tensor([[5, 6, 2, 0],
            [7, 7, 2, 0],
            [5, 2, 0, 0],
            [7, 7, 6, 2]])
    >>> batch["labels"], batch["last_index"]
    (tensor([ True, False]), tensor([ 2,  6,  9, 15]))
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        layout: Layout = "padded",
        kl_pairs: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        max_tokens_per_row: int | None = None,
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            pad_token_id,
            layout=layout,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            max_tokens_per_row=max_tokens_per_row,
            mask_dtype=mask_dtype,
        )
        self.kl_pairs = kl_pairs

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        prompts = [_ids(f, "prompt_ids") for f in features]
        completions = [_ids(f, "completion_ids") for f in features]
        sequences = [_prompt_completion(p, c) for p, c in zip(prompts, completions)]
        groups = list(range(n))
        if self.kl_pairs:
            sequences += [_prompt_completion(prompts[i], completions[(i + 1) % n]) for i in range(n)]
            groups += list(range(n))
        batch = self._build(sequences, groups=groups)
        batch["labels"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        return batch


class PointwiseCollator(_LayoutCollator):
    """Pointwise records (one completion with a scalar score) -> ``S = B`` sequences.

    Reads ``prompt_ids``, ``completion_ids`` and ``score``. Returns the :func:`build_batch` keys plus
    ``scores`` ``(S,)`` float.

    >>> feats = [{"prompt_ids": [5], "completion_ids": [6, 2], "score": 0.5},
    ...          {"prompt_ids": [7, 7, 7], "completion_ids": [2], "score": -1.0}]
    >>> batch = PointwiseCollator(pad_token_id=0, layout="packed")(feats)
    >>> batch["input_ids"], batch["position_ids"]
    (tensor([[7, 7, 7, 2],
            [5, 6, 2, 0]]), tensor([[0, 1, 2, 3],
            [0, 1, 2, 0]]))
    >>> batch["scores"], batch["last_index"]
    (tensor([ 0.5000, -1.0000]), tensor([6, 3]))
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [_prompt_completion(_ids(f, "prompt_ids"), _ids(f, "completion_ids")) for f in features]
        batch = self._build(sequences)
        batch["scores"] = torch.tensor([float(f["score"]) for f in features], dtype=torch.float32)
        return batch


class SFTCollator(_LayoutCollator):
    """Supervised fine-tuning records -> ``S = B`` sequences with completion-only ``labels``.

    Reads ``prompt_ids`` and ``completion_ids``. Besides the :func:`build_batch` keys it returns ``labels``
    ``(R, T)``: the token id where a completion token is scored, -100 on prompt and pad tokens, so a plain
    ``transformers.Trainer`` (whose model shifts labels by one) trains on completions only. Layouts:
    ``"padded"`` and ``"packed"`` (with one completion per prompt a shared prompt saves nothing, and the
    model's own label shift would be wrong there).

    With ``index_keys=False`` the index tensors are left out, so the batch holds model inputs only.

    >>> feats = [{"prompt_ids": [5, 6], "completion_ids": [7, 2]}, {"prompt_ids": [8], "completion_ids": [2]}]
    >>> batch = SFTCollator(pad_token_id=2, index_keys=False)(feats)
    >>> sorted(batch)
    ['attention_mask', 'input_ids', 'labels', 'position_ids']
    >>> batch["labels"]
    tensor([[-100, -100,    7,    2],
            [-100,    2, -100, -100]])
    """

    allowed_layouts = ("padded", "packed")

    def __init__(
        self,
        pad_token_id: int,
        *,
        layout: Literal["padded", "packed"] = "padded",
        index_keys: bool = True,
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        max_tokens_per_row: int | None = None,
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            pad_token_id,
            layout=layout,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            max_tokens_per_row=max_tokens_per_row,
            mask_dtype=mask_dtype,
        )
        self.index_keys = index_keys

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [_prompt_completion(_ids(f, "prompt_ids"), _ids(f, "completion_ids")) for f in features]
        batch = self._build(sequences)
        flat_ids = batch["input_ids"].view(-1)
        labels = torch.full_like(flat_ids, -100)
        labels[batch["target_index"]] = flat_ids[batch["target_index"]]
        batch["labels"] = labels.view_as(batch["input_ids"])
        if not self.index_keys:
            for key in INDEX_KEYS:
                del batch[key]
        return batch


class PromptCollator:
    """Prompt-only records -> left-padded ``input_ids`` and ``attention_mask`` ``(P, T)`` for generation.

    Reads ``prompt_ids``. Left padding puts every prompt's last token in column ``T - 1``, so generated
    tokens start in the same column for every row.

    >>> PromptCollator(pad_token_id=0)([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8]}])
    {'input_ids': tensor([[5, 6, 7],
            [0, 0, 8]]), 'attention_mask': tensor([[1, 1, 1],
            [0, 0, 1]])}
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set tokenizer.pad_token, e.g. to the EOS token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [[Segment(_ids(f, "prompt_ids"), False)] for f in features]
        batch = build_batch(
            sequences, self.pad_token_id, padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
