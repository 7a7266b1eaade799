"""KTOTrainer: Kahneman-Tversky Optimization on completions labelled desirable or undesirable.

Drop-in for TRL's ``KTOTrainer`` (Ethayarajh et al., 2024, arXiv:2402.01306): the same constructor
arguments, config names, dataset columns (``prompt``, ``completion``, ``label``; pairwise data is unpaired
into chosen -> True, rejected -> False) and logged metric names. The loss itself is
:func:`hfrlhf.losses.kto.kto_loss` (or ``apo_zero_unpaired``); this module only builds its inputs.

KTO's reference point ``z_0`` is a KL estimate from *mismatched* pairs (prompt ``x_i`` with another
example's completion). Where they come from:

- by default, from inside the batch: :class:`KTOCollator` lays out ``UnpairedCollator(kl_pairs=True)``
  batches, so sequence ``B + i`` is prompt ``i`` with completion ``(i + 1) mod B``; rows are first reordered
  so that neighbours have different prompts whenever the batch allows it (unpaired pairwise data puts the
  chosen and the rejected completion of one prompt next to each other);
- with ``precompute_ref_log_probs=True``, a batch of one row, or rows that carry cached reference
  log-probs: from a partner fixed per row at dataset level (:func:`add_kl_partners`: the completion of the
  next row with a different prompt in a permutation seeded by ``args.seed``), so the partner's reference
  log-prob can be cached with the row.

``z_0`` is detached, averaged over every process's pairs (all-gather) and clamped at 0, so all processes
use the same value.

>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> rows = [{"prompt": "Say hi.", "completion": " Hi there!", "label": True},
...         {"prompt": "Be rude.", "completion": " No.", "label": False}] * 2
>>> args = KTOConfig(output_dir="/tmp/kto-doctest", max_steps=2, per_device_train_batch_size=2, report_to=[],
...                  bf16=False, save_strategy="no", logging_steps=1, disable_tqdm=True)
>>> trainer = KTOTrainer(build_tiny_llama(tok), args=args, train_dataset=rows, processing_class=tok)
>>> trainer.train().global_step  # the logs printed first hold TRL's metric names
{'loss': ..., 'kl': ..., 'rewards/chosen': ..., 'rewards/margins': ..., 'count/chosen': ...}
2
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfrlhf.data.tokenize import check_tokenized
from hfrlhf.losses import get_loss
from hfrlhf.losses.kto import SUM_METRICS, desirable_undesirable_warning, kto_log_metrics, kto_reference_point
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.trainers.base import (
    HfrlhfConfig,
    HfrlhfTrainer,
    prepare_dataset,
    prepare_eval_datasets,
    prepare_policy,
)
from hfrlhf.trainers.kto_pairs import KL_COLUMN, KTOCollator, add_kl_partners
from hfrlhf.trainers.reference import (
    Reference,
    WithReferenceColumn,
    check_reference_available,
    is_peft_model,
    precompute_reference,
)

__all__ = ["KL_COLUMN", "KTOCollator", "KTOConfig", "KTOTrainer", "add_kl_partners"]

@dataclass
class KTOConfig(HfrlhfConfig):
    """Configuration of :class:`KTOTrainer`; field names follow TRL's ``KTOConfig``."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's KTO default)."})
    beta: float = field(default=0.1, metadata={"help": "Temperature of the implied reward (higher = closer to ref)."})
    loss_type: str = field(
        default="kto",
        metadata={"help": "kto (KL reference point) or apo_zero_unpaired (anchored at 0, no KL pairs).",
                  "choices": ["kto", "apo_zero_unpaired"]},
    )
    desirable_weight: float = field(default=1.0, metadata={"help": "lambda_D, weight of desirable examples."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "lambda_U, weight of undesirable examples."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad the sequence length to a multiple."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs once before training and cache them on disk."}
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the precomputation (default: the eval batch size)."}
    )
    ref_cache_dir: str | None = field(
        default=None, metadata={"help": "Where cached reference log-probs live (default: ~/.cache/hfrlhf/ref_logps)."}
    )

    def __post_init__(self) -> None:
        get_loss("kto", self.loss_type)  # fails early on unknown names
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be positive, got {self.desirable_weight} and "
                f"{self.undesirable_weight}"
            )
        super().__post_init__()

    @property
    def uses_kl(self) -> bool:
        """Whether the loss needs the KL reference point (and so mismatched pairs in every batch)."""
        return "kl" in get_loss("kto", self.loss_type).needs


# --- reference cache mapping -------------------------------------------------------------------------------------
def _ref_to_sequences(batch: dict[str, torch.Tensor], per_row: Sequence[Sequence[float]]) -> torch.Tensor:
    width = batch["last_index"].shape[0] // len(per_row)  # 1 (no KL pairs) or 2
    return torch.tensor([r[k] for k in range(width) for r in per_row], dtype=torch.float32)


def _rows_from_sequences(batch: dict[str, torch.Tensor], seq: torch.Tensor, n: int) -> list[list[float]]:
    b = batch["labels"].shape[0]
    return seq.view(-1, b).T.tolist()  # (B, 1 or 2): the row's completion, then its KL partner


def _kl_first_row(batch: dict[str, torch.Tensor], b: int) -> int | None:
    """First row of the KL half when sequences ``B..2B-1`` sit in rows after those of ``0..B-1`` (every layout
    :class:`KTOCollator` builds), else ``None`` (one forward for both halves)."""
    rows = batch["last_index"] // batch["input_ids"].shape[1]  # (S,) the row of each sequence
    first = int(rows[b:].min())
    return first if int(rows[:b].max()) < first else None


def _sequences(batch: dict[str, torch.Tensor], lo: int, hi: int, r0: int, r1: int) -> dict[str, torch.Tensor]:
    """Sequences ``lo..hi-1``, which fill rows ``r0..r1-1`` of the batch, as a batch of their own."""
    width = batch["input_ids"].shape[1]
    seq = batch["target_seq"]
    keep = (seq >= lo) & (seq < hi)
    out = {k: batch[k][r0:r1] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out["pred_index"] = batch["pred_index"][keep] - r0 * width
    out["target_index"] = batch["target_index"][keep] - r0 * width
    out["target_seq"] = seq[keep] - lo
    out["last_index"] = batch["last_index"][lo:hi] - r0 * width
    if "attention_blocks" in batch:  # (K, 5): row, then columns
        blocks = batch["attention_blocks"]
        blocks = blocks[(blocks[:, 0] >= r0) & (blocks[:, 0] < r1)].clone()
        blocks[:, 0] -= r0
        out["attention_blocks"] = blocks
    return out


def _unpair_tokenized(dataset: Dataset) -> Dataset:
    """Tokenized pairwise rows -> tokenized unpaired rows (chosen -> True, rejected -> False)."""

    def split(rows: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": []}
        for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]):
            out["prompt_ids"] += [p, p]
            out["completion_ids"] += [c, r]
            out["label"] += [True, False]
        return out

    return dataset.map(split, batched=True, remove_columns=dataset.column_names, desc="Unpairing pairs")


class KTOTrainer(HfrlhfTrainer):
    """Train a policy on unpaired desirable/undesirable completions with the KTO loss (``args.loss_type``).

    Args:
        model: a causal LM, or a name/path (``"smollm2-135m-instruct"`` for the bundled model).
        ref_model: an explicit frozen reference; by default the policy with its adapter off (LoRA), or a
            frozen copy of the policy (full fine-tuning), or nothing with ``precompute_ref_log_probs``.
        args: :class:`KTOConfig`.
        train_dataset / eval_dataset: unpaired data (``prompt``, ``completion``, ``label``) or pairwise data
            (unpaired here), in any schema ``hfrlhf.data.load`` reads, or already tokenized.
        processing_class: the tokenizer (loaded from the model's name when omitted).
        peft_config: a peft ``LoraConfig`` to train an adapter instead of all weights.
    """

    _tag_names = ["hfrlhf", "kto"]

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        ref_model: PreTrainedModel | nn.Module | str | None = None,
        args: KTOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        args = args or KTOConfig(output_dir="kto-output")
        # the reference: explicit, a frozen copy (full fine-tuning), the policy with its adapter off (LoRA), or
        # cached log-probs
        model, processing_class, ref_model = prepare_policy(
            model, processing_class, args, peft_config, ref_model, copy_reference=not args.precompute_ref_log_probs)

        self.loss_spec = get_loss("kto", args.loss_type)
        self.uses_kl = args.uses_kl
        if train_dataset is not None:
            train_dataset = self._prepare(train_dataset, processing_class, args, "train_dataset")
            self._warn_on_balance(train_dataset, args)
        eval_dataset = prepare_eval_datasets(  # one dataset, or a dict of named ones
            eval_dataset, lambda data, name: self._prepare(data, processing_class, args, name))

        collator_kw = dict(layout=args.layout, kl_pairs=self.uses_kl, pad_to_multiple_of=args.pad_to_multiple_of,
                           max_tokens_per_row=args.max_tokens_per_row)
        base_collator = data_collator or KTOCollator(processing_class.pad_token_id, **collator_kw)
        self._precompute_collator = KTOCollator(processing_class.pad_token_id, kl_source="row", **collator_kw)

        use_adapter_off = ref_model is None and is_peft_model(model)

        super().__init__(
            model=model,
            args=args,
            data_collator=WithReferenceColumn(base_collator, _ref_to_sequences),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        if ref_model is not None:
            ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.ref_model = ref_model
        self.reference = Reference(
            ref_model, use_adapter_off=use_adapter_off, chunk_size=args.logprob_chunk_size, autocast=self.accelerator.autocast
        )
        if args.precompute_ref_log_probs:
            self.train_dataset = self._precompute(self.train_dataset)
            self.eval_dataset = prepare_eval_datasets(self.eval_dataset, lambda data, _: self._precompute(data))

    # --- data ------------------------------------------------------------------------------------------------
    def _prepare(self, data: Any, tokenizer: PreTrainedTokenizerBase, args: KTOConfig, name: str) -> Dataset:
        """Unpaired, tokenized rows (pairwise data unpaired first), with KL partners when the loss uses them."""
        if isinstance(data, Dataset) and "prompt_ids" in data.column_names:
            if "chosen_ids" in data.column_names:
                data = _unpair_tokenized(data)
            if "label" not in data.column_names:
                raise ValueError(f"{name}: tokenized rows need a 'label' column, got {data.column_names}")
            check_tokenized(data, len(tokenizer), source=name, kinds=("unpaired",))  # named here, not in the forward
        else:
            data = prepare_dataset(data, tokenizer, args, kinds=("unpaired",), name=name)
        if self.uses_kl:
            data = add_kl_partners(data, seed=args.seed, max_length=args.max_length)
        return data

    def prepare_eval_dataset(self, data: Any, name: str = "eval_dataset") -> Dataset:
        """As ``__init__`` prepares ``eval_dataset``: unpaired, tokenized, with KL partners when the loss uses
        them and, with ``precompute_ref_log_probs``, the reference log-probs of these rows."""
        data = self._prepare(data, self.processing_class, self.args, name)
        if self.args.precompute_ref_log_probs:
            check_reference_available(self.reference, data, trained=self.state.global_step > 0, name=name)
            data = self._precompute(data)
        return data

    @staticmethod
    def _warn_on_balance(dataset: Dataset, args: KTOConfig) -> None:
        labels = dataset["label"]
        desirable = sum(bool(x) for x in labels)
        message = desirable_undesirable_warning(
            desirable, len(labels) - desirable, args.desirable_weight, args.undesirable_weight
        )
        if message:
            warnings.warn(message, UserWarning, stacklevel=3)

    def _precompute(self, dataset: Dataset | None) -> Dataset | None:
        if dataset is None:
            return None
        if not self.reference.needs_model:
            # full fine-tuning without an explicit reference: the policy before training is the reference
            self.reference = Reference(self.model, use_adapter_off=False, chunk_size=self.args.logprob_chunk_size,
                                       autocast=self.accelerator.autocast)
        dtype = "bf16" if self.args.bf16 else "fp32"
        out = precompute_reference(
            dataset,
            policy=self.model,
            reference=self.reference,
            collate=self._precompute_collator,
            per_row=_rows_from_sequences,
            batch_size=self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
            device=self.accelerator.device,
            extra_key=f"kto|{self.uses_kl}|{dtype}|{self.args.max_length}|{self.args.max_prompt_length}|{self.args.layout}",
            cache_root=self.args.ref_cache_dir,
        )
        if self.reference.ref_model is self.model:
            self.reference = Reference(None, use_adapter_off=False)
        return out

    # --- loss ------------------------------------------------------------------------------------------------
    def _policy_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` log-probs of the batch's completions (with grad) and ``(B,)`` of its KL pairs (without)."""
        chunk = self.args.logprob_chunk_size
        if not self.uses_kl:
            return batch_logprobs(model, inputs, chunk_size=chunk).seq_logps, torch.zeros(0)
        first = _kl_first_row(inputs, b)
        if first is None:  # a collator that mixes the halves in rows: one forward, the KL half detached
            logps = batch_logprobs(model, inputs, chunk_size=chunk).seq_logps
            return logps[:b], logps[b:].detach()
        # the KL half in its own forward without grad, as the paper's z_0 takes none: backward never walks it
        rows = inputs["input_ids"].shape[0]
        logps = batch_logprobs(model, _sequences(inputs, 0, b, 0, first), chunk_size=chunk).seq_logps
        with torch.no_grad():
            kl_logps = batch_logprobs(model, _sequences(inputs, b, 2 * b, first, rows), chunk_size=chunk).seq_logps
        return logps, kl_logps

    def _all_pairs(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """Every process's KL-pair log-ratios (processes may hold different numbers of pairs)."""
        if self.accelerator.num_processes == 1:
            return log_ratio
        padded = self.accelerator.pad_across_processes(log_ratio.float(), dim=0, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        b = labels.shape[0]
        logps, kl_logps = self._policy_logps(model, inputs, b)
        ref = self.reference.seq_logps(model, inputs).to(logps.device)  # (S,)
        if self.uses_kl:
            kl = kto_reference_point(kl_logps, ref[b:], gather=self._all_pairs)
        else:
            kl = logps.new_zeros(())
        out = self.loss_spec.fn(logps, ref[:b], labels, kl=kl, beta=self.args.beta,
                                desirable_weight=self.args.desirable_weight,
                                undesirable_weight=self.args.undesirable_weight)
        loss = self.guard_loss(out.loss, model)
        self._store_sums(out.metrics)
        return (loss, {"metrics": out.metrics}) if return_outputs else loss

    # --- metrics ---------------------------------------------------------------------------------------------
    def _store_sums(self, metrics: dict[str, torch.Tensor]) -> None:
        """Add this micro-batch's metric sums over all processes; ``log()`` turns them into TRL's means."""
        sums = torch.stack([metrics[k].detach().float().reshape(()) for k in SUM_METRICS]).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.gather(sums[None]).sum(0)
        store = self._metrics[self._mode]
        for name, value in zip(SUM_METRICS, sums.tolist()):
            store[name].append(value)
        store["kl"].append(float(metrics["kl"]))  # the same on every process

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        store = self._metrics[self._mode]
        totals = {k: sum(store.pop(k)) for k in SUM_METRICS if store.get(k)}
        if totals:
            for name, value in kto_log_metrics(totals).items():
                store[name] = [value]
            store["count/chosen"] = [totals["count/chosen"]]
            store["count/rejected"] = [totals["count/rejected"]]
        super().log(logs, start_time)
