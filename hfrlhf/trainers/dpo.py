"""DPOTrainer: direct preference optimisation and its family, pairwise and listwise.

Drop-in for TRL's ``DPOTrainer``: the same constructor arguments, config names, dataset columns and logged
metric names. On top: a registry of losses (``loss_type``), listwise data with listwise losses, a
reference as an explicit model, the policy with its adapter off, or log-probs cached on disk, and
log-probs computed from hidden states in chunks over the vocabulary (no ``[B, T, vocab]`` logits).

>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> rows = [{"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " No."}] * 4
>>> args = DPOConfig(output_dir="/tmp/dpo-doctest", max_steps=2, per_device_train_batch_size=2, report_to=[],
...                  bf16=False, save_strategy="no", logging_steps=1, disable_tqdm=True)
>>> trainer = DPOTrainer(build_tiny_llama(tok), args=args, train_dataset=rows, processing_class=tok)
>>> trainer.train().global_step
2
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfrlhf.data.collators import ListwiseCollator, PairwiseCollator
from hfrlhf.losses import get_loss
from hfrlhf.losses.listwise import ListLogps
from hfrlhf.losses.preference import PairLogps, chosen_nll
from hfrlhf.models.loading import load_causal_lm, load_tokenizer
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.trainers.base import HfrlhfConfig, HfrlhfTrainer, attach_peft, disable_dropout, prepare_dataset
from hfrlhf.trainers.reference import Reference, WithReferenceColumn, is_peft_model, precompute_reference

__all__ = ["DPOConfig", "DPOTrainer"]


@dataclass
class DPOConfig(HfrlhfConfig):
    """Configuration of :class:`DPOTrainer`; field names follow TRL's ``DPOConfig`` where TRL has them."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's DPO default)."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL leash to the reference (higher = closer)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Loss name(s): sigmoid, ipo, hinge, robust, simpo, orpo, rdpo; listwise: lipo, pro, rrhf. "
                          "Several are summed with loss_weights."},
    )
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of several loss_type."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Probability that a preference label is flipped (cDPO / robust DPO)."}
    )
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Weight of an NLL term on the chosen completions, added to any loss (RPO)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of the NLL term SimPO/CPO add on chosen."})
    rdpo_alpha: float = field(default=0.0, metadata={"help": "R-DPO length penalty on the margin (|y_w| - |y_l|)."})
    loss_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Extra keyword arguments for the loss function (by name)."}
    )
    reference_free: bool = field(
        default=False, metadata={"help": "Use a uniform reference (log-prob 0) instead of a reference model."}
    )
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
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        specs = [get_loss("preference", name) for name in self.loss_type]  # fails early on unknown names
        if len({s.listwise for s in specs}) > 1:
            raise ValueError(f"loss_type mixes pairwise and listwise losses: {self.loss_type}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"{len(self.loss_weights)} loss_weights for {len(self.loss_type)} loss types")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        super().__post_init__()

    @property
    def is_listwise(self) -> bool:
        return get_loss("preference", self.loss_type[0]).listwise

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and not all(get_loss("preference", n).reference_free for n in self.loss_type)

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments handed to every loss function (each ignores what it does not use)."""
        return {"beta": self.beta, "label_smoothing": self.label_smoothing, "simpo_gamma": self.simpo_gamma,
                "rdpo_alpha": self.rdpo_alpha, "cpo_alpha": self.cpo_alpha, **(self.loss_kwargs or {})}


def _pairwise_ref_sequences(batch: dict[str, torch.Tensor], per_row: Sequence[Sequence[float]]) -> torch.Tensor:
    chosen = [r[0] for r in per_row]
    rejected = [r[1] for r in per_row]
    return torch.tensor(chosen + rejected, dtype=torch.float32)


def _listwise_ref_sequences(batch: dict[str, torch.Tensor], per_row: Sequence[Sequence[float]]) -> torch.Tensor:
    seq = batch["response_seq"]
    out = torch.zeros(batch["last_index"].shape[0], dtype=torch.float32)
    for p, row in enumerate(per_row):
        for k, value in enumerate(row):
            out[seq[p, k]] = value
    return out


def _pairwise_rows(batch: dict[str, torch.Tensor], seq: torch.Tensor, n: int) -> list[list[float]]:
    b = seq.shape[0] // 2
    return [[c, r] for c, r in zip(seq[:b].tolist(), seq[b:].tolist())]


def _listwise_rows(batch: dict[str, torch.Tensor], seq: torch.Tensor, n: int) -> list[list[float]]:
    values = seq.tolist()
    return [[values[s] for s in row if s >= 0] for row in batch["response_seq"].tolist()]


class DPOTrainer(HfrlhfTrainer):
    """Train a policy on preference data with a DPO-family loss (``args.loss_type``).

    Args:
        model: a causal LM, or a name/path (``"smollm2-135m-instruct"`` for the bundled model).
        ref_model: an explicit frozen reference; by default the policy with its adapter off (LoRA), a frozen
            copy of the policy (full fine-tuning), or nothing (reference-free losses, cached log-probs).
        args: :class:`DPOConfig`.
        train_dataset / eval_dataset: pairwise or listwise data in any schema ``hfrlhf.data.load`` reads
            (a ``datasets.Dataset``, a list of rows, or a path).
        processing_class: the tokenizer (loaded from the model's name when omitted).
        peft_config: a peft ``LoraConfig`` to train an adapter instead of all weights.
    """

    _tag_names = ["hfrlhf", "dpo"]

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        ref_model: PreTrainedModel | nn.Module | str | None = None,
        args: DPOConfig | None = None,
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
        args = args or DPOConfig(output_dir="dpo-output")
        if isinstance(model, str):
            processing_class = processing_class or load_tokenizer(model)
            model = load_causal_lm(model)
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model)
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required when model is not given by name")
        if processing_class.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its EOS token)")
        model = attach_peft(model, peft_config, args)
        if args.disable_dropout:
            disable_dropout(model)

        self.loss_specs = [get_loss("preference", n) for n in args.loss_type]
        self.loss_weights = args.loss_weights or [1.0] * len(self.loss_specs)
        kinds = ("listwise",) if args.is_listwise else ("pairwise",)
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, processing_class, args, kinds=kinds)
        if eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, processing_class, args, kinds=kinds, name="eval_dataset")

        layout_cls = ListwiseCollator if args.is_listwise else PairwiseCollator
        base_collator = data_collator or layout_cls(processing_class.pad_token_id, layout=args.layout)
        to_seq = _listwise_ref_sequences if args.is_listwise else _pairwise_ref_sequences
        self._per_row = _listwise_rows if args.is_listwise else _pairwise_rows

        # the reference: explicit, adapter-off, a frozen copy, or none
        if args.needs_reference and ref_model is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model)  # full fine-tuning: the reference is the policy as it starts
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            if args.disable_dropout:
                disable_dropout(ref_model)
        use_adapter_off = args.needs_reference and ref_model is None and is_peft_model(model)
        if args.needs_reference and ref_model is None and not use_adapter_off and not args.precompute_ref_log_probs:
            raise ValueError("a reference is needed: pass ref_model, a peft_config, or precompute_ref_log_probs=True")

        super().__init__(
            model=model,
            args=args,
            data_collator=WithReferenceColumn(base_collator, to_seq),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self._base_collator = base_collator
        if ref_model is not None:
            ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.ref_model = ref_model
        self.reference = Reference(
            ref_model, use_adapter_off=use_adapter_off, chunk_size=args.logprob_chunk_size, autocast=self.accelerator.autocast
        )
        if args.needs_reference and args.precompute_ref_log_probs:
            self.train_dataset = self._precompute(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._precompute(self.eval_dataset)

    # --- reference cache -----------------------------------------------------------------------------------
    def _precompute(self, dataset):
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
            collate=self._base_collator,
            per_row=self._per_row,
            batch_size=self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
            device=self.accelerator.device,
            extra_key=f"{dtype}|{self.args.max_length}|{self.args.max_prompt_length}|{self.args.layout}",
            cache_root=self.args.ref_cache_dir,
        )
        if self.reference.ref_model is self.model:
            self.reference = Reference(None, use_adapter_off=False)
        return out

    # --- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = batch_logprobs(model, inputs, chunk_size=self.args.logprob_chunk_size)
        ref_seq = self.reference.seq_logps(model, inputs) if self.args.needs_reference else None
        hyper = self.args.hyperparameters()
        if self.args.is_listwise:
            loss, metrics = self._listwise_loss(policy.seq_logps, policy.seq_lens, ref_seq, inputs, hyper)
        else:
            loss, metrics = self._pairwise_loss(policy.seq_logps, policy.seq_lens, ref_seq, inputs, hyper)
        loss = self.guard_loss(loss, model)
        self.store_metrics(metrics)
        return (loss, {"metrics": metrics}) if return_outputs else loss

    def _pairwise_loss(self, seq_logps, seq_lens, ref_seq, inputs, hyper):
        b = seq_logps.shape[0] // 2
        pol = PairLogps(seq_logps[:b], seq_logps[b:], seq_lens[:b], seq_lens[b:])
        ref = PairLogps(ref_seq[:b], ref_seq[b:], seq_lens[:b], seq_lens[b:]) if ref_seq is not None else None
        total, metrics = 0.0, {}
        for spec, weight in zip(self.loss_specs, self.loss_weights):
            out = spec.fn(pol, ref if not spec.reference_free else None, margin=inputs.get("margin"), **hyper)
            total = total + weight * out.loss
            metrics = {**out.metrics, **metrics}
        if self.args.rpo_alpha:
            nll = chosen_nll(pol)
            total = total + self.args.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        if ref is not None:  # k1 estimate of KL(policy || ref) per token on the data's completions
            metrics["kl"] = ((seq_logps - ref_seq).sum() / seq_lens.sum().clamp(min=1)).detach()
        return total, metrics

    def _listwise_loss(self, seq_logps, seq_lens, ref_seq, inputs, hyper):
        idx = inputs["response_seq"].clamp(min=0)
        mask = inputs["response_mask"]
        pol = ListLogps(seq_logps[idx], seq_lens[idx])
        ref = ListLogps(ref_seq[idx], seq_lens[idx]) if ref_seq is not None else None
        total, metrics = 0.0, {}
        for spec, weight in zip(self.loss_specs, self.loss_weights):
            out = spec.fn(pol, ref if not spec.reference_free else None, inputs["scores"], mask, **hyper)
            total = total + weight * out.loss
            metrics = {**out.metrics, **metrics}
        if ref is not None:
            metrics["kl"] = ((seq_logps - ref_seq).sum() / seq_lens.sum().clamp(min=1)).detach()
        return total, metrics
