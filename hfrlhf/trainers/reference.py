"""The reference policy of DPO, KTO and PPO, in one of three forms.

1. an explicit frozen model (``ref_model=``);
2. the policy itself with its LoRA adapter disabled: no second copy of the weights in memory;
3. log-probs computed once before training and cached on disk, keyed by the model and the data, so the
   reference model is not needed during training at all (``precompute_ref_log_probs=True``).

Trainers call :meth:`Reference.seq_logps` with the batch and get ``(S,)`` summed log-probs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hfrlhf.models.bundled import cache_dir
from hfrlhf.ops.logprobs import batch_logprobs

logger = logging.getLogger(__name__)

REF_COLUMN = "ref_logps"  # per row: one float per completion, in the row's completion order


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(_unwrap(model), PeftModel)


class Reference:
    """Where reference log-probs come from; see the module docstring for the three forms.

    ``to_sequences(batch, per_row)`` maps per-row cached values (``(B, C)``, C completions per row) onto the
    batch's ``S`` sequences; each trainer passes the mapping for its kind of data.
    """

    def __init__(
        self,
        ref_model: nn.Module | None,
        *,
        use_adapter_off: bool,
        chunk_size: int = 1024,
        autocast: Callable[[], Any] | None = None,
    ) -> None:
        self.ref_model = ref_model
        self.use_adapter_off = use_adapter_off
        self.chunk_size = chunk_size
        self.autocast = autocast or nullcontext

    @property
    def needs_model(self) -> bool:
        return self.ref_model is not None or self.use_adapter_off

    @torch.no_grad()
    def seq_logps(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(S,)`` reference log-probs of the batch's sequences, from the cache column when present."""
        if "ref_seq_logps" in batch:
            return batch["ref_seq_logps"].float()
        with self.autocast():
            if self.ref_model is not None:
                return batch_logprobs(self.ref_model, batch, chunk_size=self.chunk_size).seq_logps
            if self.use_adapter_off:
                inner = _unwrap(policy)
                with inner.disable_adapter():
                    return batch_logprobs(inner, batch, chunk_size=self.chunk_size).seq_logps
        raise RuntimeError("no reference available: pass ref_model, use a peft adapter, or precompute log-probs")


def check_reference_available(reference: Reference, data: Dataset, *, trained: bool, name: str) -> None:
    """Fail clearly when ``data`` still needs reference log-probs that can no longer be computed: in full
    fine-tuning without a ``ref_model`` the reference is the policy before training, gone once it has trained."""
    if not reference.needs_model and REF_COLUMN not in data.column_names and trained:
        raise ValueError(
            f"{name}: its reference log-probs cannot be computed after training without a reference model "
            "(the reference was the policy before training); pass these rows as eval_dataset to the "
            "constructor, or pass ref_model"
        )


def _fingerprint_model(model: nn.Module) -> str:
    """A cheap, content-based identity of a model: its config plus a few weight statistics."""
    inner = _unwrap(model)
    h = hashlib.sha256()
    cfg = getattr(inner, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        params = [p for _, p in sorted(inner.named_parameters(), key=lambda kv: kv[0])]
        for p in params[:: max(1, len(params) // 16)]:
            flat = p.detach().float().flatten()
            h.update(f"{p.shape}:{flat.sum().item():.6e}:{flat.abs().sum().item():.6e}:{flat[:8].tolist()}".encode())
    return h.hexdigest()[:16]


def precompute_reference(
    dataset: Dataset,
    *,
    policy: nn.Module,
    reference: Reference,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    per_row: Callable[[dict[str, torch.Tensor], torch.Tensor, int], list[list[float]]],
    batch_size: int,
    device: torch.device,
    extra_key: str = "",
    cache_root: str | os.PathLike | None = None,
) -> Dataset:
    """Add a ``ref_logps`` column (one float per completion of each row), computed once and cached on disk.

    The cache file is keyed by the reference model's fingerprint, the dataset's fingerprint and
    ``extra_key`` (e.g. max_length, dtype); a second run with the same key reads the file instead of running
    the model. Files are written to a temporary name and renamed, so a crash never leaves a bad cache.
    """
    if REF_COLUMN in dataset.column_names:
        return dataset
    model = reference.ref_model if reference.ref_model is not None else policy
    key_src = f"{_fingerprint_model(model)}|{reference.use_adapter_off}|{dataset._fingerprint}|{len(dataset)}|{extra_key}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    root = Path(cache_root) if cache_root else cache_dir() / "ref_logps"
    path = root / f"{key}.safetensors"
    if path.is_file():
        logger.info("reference log-probs read from cache %s", path)
        table = load_file(str(path))["ref_logps"]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        rows: list[list[float]] = []
        was_training = policy.training
        policy.eval()
        for batch in tqdm(loader, desc="reference log-probs", leave=False):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            seq = reference.seq_logps(policy, batch)
            rows.extend(per_row(batch, seq, len(next(iter(batch.values())))))
        policy.train(was_training)
        width = max(len(r) for r in rows)
        table = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            table[i, : len(r)] = torch.tensor(r)
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"ref_logps": table.contiguous()}, str(tmp))
        os.replace(tmp, path)
        logger.info("reference log-probs cached in %s", path)
    if table.shape[0] != len(dataset):
        raise RuntimeError(f"reference cache {path} has {table.shape[0]} rows for a dataset of {len(dataset)}")
    values = [[v for v in row if v == v] for row in table.tolist()]
    return dataset.add_column(REF_COLUMN, values)


class WithReferenceColumn:
    """Wraps a collator: when rows carry cached ``ref_logps``, add ``ref_seq_logps (S,)`` to the batch."""

    def __init__(self, collator: Callable, to_sequences: Callable[[dict[str, torch.Tensor], Sequence[Sequence[float]]], torch.Tensor]):
        self.collator = collator
        self.to_sequences = to_sequences

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        if features and REF_COLUMN in features[0]:
            batch["ref_seq_logps"] = self.to_sequences(batch, [f[REF_COLUMN] for f in features])
        return batch
