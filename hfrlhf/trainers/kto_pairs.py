"""KTO's mismatched pairs: where the (prompt, another example's completion) sequences of the KL reference
point come from.

KTO (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 8) estimates ``z_0 = KL(pi || pi_ref)`` on prompts paired
with completions written for other prompts. Two sources, both used by :class:`hfrlhf.trainers.kto.KTOTrainer`:

- the batch itself: :class:`KTOCollator` reorders the rows so neighbours have different prompts and pairs
  row ``i``'s prompt with row ``i + 1``'s completion;
- a partner fixed per row at dataset level (:func:`add_kl_partners`), so its reference log-prob can be
  cached with the row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset

from hfrlhf.data.collators import Segment, UnpairedCollator, build_batch
from hfrlhf.trainers.reference import REF_COLUMN

__all__ = ["KL_COLUMN", "KTOCollator", "add_kl_partners"]

KL_COLUMN = "kl_completion_ids"  # per row: the completion ids of its fixed mismatched partner


# --- mismatched pairs ------------------------------------------------------------------------------------------
def _next_different(keys: Sequence[Any]) -> list[int]:
    """For each position k of a cycle, the first position after k whose key differs (k + 1 if none does)."""
    n = len(keys)
    ext = list(keys) * 2
    nxt: list[int | None] = [None] * (2 * n)
    for p in range(2 * n - 2, -1, -1):
        nxt[p] = p + 1 if ext[p + 1] != ext[p] else nxt[p + 1]
    return [(nxt[k] if nxt[k] is not None else k + 1) % n for k in range(n)]


def add_kl_partners(dataset: Dataset, *, seed: int = 0, max_length: int | None = None) -> Dataset:
    """Give every tokenized unpaired row a fixed mismatched completion, in a ``kl_completion_ids`` column.

    The rows are put in a cycle by a permutation seeded with ``seed``; a row's partner is the next row of
    the cycle whose prompt differs (so the pair really is mismatched; only when every prompt is the same
    does a row get the next row). Partners are cut so that prompt + partner fits ``max_length``. The result
    depends only on the dataset and the arguments, so cached reference log-probs stay valid across runs.

    >>> ds = Dataset.from_dict({"prompt_ids": [[1], [1], [2], [3]], "completion_ids": [[5], [6], [7], [8]],
    ...                         "label": [True, False, True, False]})
    >>> rows = add_kl_partners(ds, seed=0)
    >>> all(r["kl_completion_ids"] != r["completion_ids"] for r in rows)
    True
    """
    if KL_COLUMN in dataset.column_names:
        return dataset
    n = len(dataset)
    prompts, completions = list(dataset["prompt_ids"]), list(dataset["completion_ids"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    step = _next_different([tuple(prompts[i]) for i in order]) if n else []
    partner = [0] * n
    for k, row in enumerate(order):
        partner[row] = order[step[k]]
    column = []
    for row in range(n):
        ids = list(completions[partner[row]])
        if max_length is not None:
            ids = ids[: max(1, max_length - len(prompts[row]))]
        column.append(ids)
    fingerprint = hashlib.sha256(f"{dataset._fingerprint}|{KL_COLUMN}|{seed}|{max_length}".encode()).hexdigest()[:16]
    return dataset.add_column(KL_COLUMN, column, new_fingerprint=fingerprint)


def _mismatched_order(keys: Sequence[Any]) -> list[int]:
    """An order of the rows in which row i and row (i + 1) mod B have different prompts, when one exists
    among the simple interleavings; the identity when it already holds (so distinct prompts keep their order)."""
    n = len(keys)
    if n < 2 or all(keys[i] != keys[(i + 1) % n] for i in range(n)):
        return list(range(n))
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    flat = [i for g in sorted(groups.values(), key=len, reverse=True) for i in g]
    slots = list(range(0, n, 2)) + list(range(1, n, 2))  # biggest group on every other slot
    order = [0] * n
    for slot, i in zip(slots, flat):
        order[slot] = i
    return order


class KTOCollator(UnpairedCollator):
    """``UnpairedCollator(kl_pairs=True)`` whose mismatched pairs are really mismatched.

    Returns ``S = 2B`` sequences (``S = B`` with ``kl_pairs=False``): sequence ``i`` is row ``i``, sequence
    ``B + i`` is row ``i``'s prompt with a mismatched completion, plus ``labels`` ``(B,)`` bool. The
    mismatched completion is

    - the next row's, after reordering the rows so neighbours have different prompts (``kl_source="batch"``);
    - the row's own ``kl_completion_ids`` (see :func:`add_kl_partners`) with ``kl_source="row"``, and also
      in batch mode when the batch holds one row or the rows carry cached reference log-probs.

    >>> feats = [{"prompt_ids": [5], "completion_ids": [6, 2], "label": True},
    ...          {"prompt_ids": [5], "completion_ids": [7, 2], "label": False},
    ...          {"prompt_ids": [8], "completion_ids": [9, 2], "label": True},
    ...          {"prompt_ids": [3], "completion_ids": [4, 2], "label": False}]
    >>> batch = KTOCollator(pad_token_id=0)(feats)
    >>> batch["input_ids"][4:], batch["labels"]  # the two rows of prompt 5 are no longer neighbours
    (tensor([[5, 9, 2],
            [8, 7, 2],
            [5, 4, 2],
            [3, 6, 2]]), tensor([ True,  True, False, False]))
    """

    def __init__(self, pad_token_id: int, *, kl_pairs: bool = True, kl_source: str = "batch", **kwargs: Any) -> None:
        super().__init__(pad_token_id, kl_pairs=kl_pairs, **kwargs)
        if kl_source not in ("batch", "row"):
            raise ValueError(f"kl_source must be 'batch' or 'row', got {kl_source!r}")
        self.kl_source = kl_source

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not self.kl_pairs:
            return super().__call__(features)
        use_rows = self.kl_source == "row" or len(features) == 1 or REF_COLUMN in features[0]
        if use_rows and KL_COLUMN not in features[0]:
            raise ValueError(f"rows need a {KL_COLUMN!r} column here: add it with add_kl_partners(dataset)")
        if not use_rows:
            keys = [tuple(f["prompt_ids"]) for f in features]
            features = [features[i] for i in _mismatched_order(keys)]
        n = len(features)
        prompts = [list(f["prompt_ids"]) for f in features]
        completions = [list(f["completion_ids"]) for f in features]
        partners = [list(f[KL_COLUMN]) for f in features] if use_rows else completions[1:] + completions[:1]
        sequences = [[Segment(p, False), Segment(c, True)] for p, c in zip(prompts, completions)]
        sequences += [[Segment(p, False), Segment(c, True)] for p, c in zip(prompts, partners)]
        batch = self._build(sequences, groups=list(range(n)) * 2) if self.layout == "padded" else self._halves(sequences)
        batch["labels"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        return batch

    def _halves(self, sequences: Sequence[Sequence[Segment]]) -> dict[str, torch.Tensor]:
        """Packed / shared_prompt: the ``B`` completions and the ``B`` KL pairs laid out in rows of their own.

        The KL half then runs in a separate forward without grad (as in the padded layout), so backward never
        walks its activations. Within a half, ``shared_prompt`` lays out each distinct prompt once with all of
        its sequences. Rows ``0..R1-1`` hold sequences ``0..B-1``, rows ``R1..R-1`` sequences ``B..2B-1``.
        """
        n = len(sequences) // 2
        halves = [sequences[:n], sequences[n:]]
        groups = [_prompt_groups(h) for h in halves]
        parts = [self._build(h, groups=g) for h, g in zip(halves, groups)]
        width = max(p["input_ids"].shape[1] for p in parts)
        for k, (h, g) in enumerate(zip(halves, groups)):  # one width for both halves: rebuild the narrower one
            if parts[k]["input_ids"].shape[1] != width:
                capacity = self.max_tokens_per_row or (width if self.layout == "packed" else None)
                parts[k] = build_batch(h, self.pad_token_id, layout=self.layout, groups=g, pad_to_multiple_of=width,
                                       max_tokens_per_row=capacity, mask_dtype=self.mask_dtype)
        main, kl = parts
        shift = main["input_ids"].shape[0] * width  # flat offset of the KL half's first row
        out = {k: torch.cat([main[k], kl[k]]) for k in ("input_ids", "attention_mask", "position_ids")}
        for k in ("pred_index", "target_index", "last_index"):
            out[k] = torch.cat([main[k], kl[k] + shift])
        out["target_seq"] = torch.cat([main["target_seq"], kl["target_seq"] + n])
        blocks = kl["attention_blocks"].clone()
        blocks[:, 0] += main["input_ids"].shape[0]
        out["attention_blocks"] = torch.cat([main["attention_blocks"], blocks])
        return out


def _prompt_groups(sequences: Sequence[Sequence[Segment]]) -> list[int]:
    """Group number of each sequence: sequences with the same prompt (first segment) share one."""
    ids: dict[tuple[int, ...], int] = {}
    return [ids.setdefault(tuple(s[0].ids), len(ids)) for s in sequences]
