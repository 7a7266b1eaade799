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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfrlhf.data.collators import ListwiseCollator, PairwiseCollator
from hfrlhf.losses import get_loss
from hfrlhf.losses.listwise import ListLogps, best_response_nll
from hfrlhf.losses.preference import F_DIVERGENCES, PairLogps, chosen_nll
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.trainers.base import (
    HfrlhfConfig,
    HfrlhfTrainer,
    prepare_dataset,
    prepare_eval_datasets,
    prepare_policy,
)
from hfrlhf.trainers.reference import (
    Reference,
    WithReferenceColumn,
    check_reference_available,
    is_peft_model,
    precompute_reference,
)

__all__ = ["DPOConfig", "DPOTrainer"]


# the config fields handed to every loss function (each ignores those it does not use)
_LOSS_FIELDS = ("beta", "label_smoothing", "simpo_gamma", "cpo_alpha", "rdpo_alpha", "discopop_tau",
                "f_divergence_type", "f_alpha_divergence_coef")


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
        default=None, metadata={"help": "Weight of an NLL term on the chosen completions (listwise: each "
                                       "list's best-scored response), added to any loss (RPO)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of the NLL term SimPO/CPO add on chosen."})
    rdpo_alpha: float = field(default=0.0, metadata={"help": "R-DPO length penalty on the margin (|y_w| - |y_l|)."})
    discopop_tau: float = field(
        default=0.05, metadata={"help": "DiscoPOP temperature: how sharply the margin blends its logistic and "
                                        "exponential terms (loss_type='discopop'; the paper's 0.05)."}
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "f-DPO regulariser between policy and reference: reverse_kl (DPO), forward_kl, "
                          "js_divergence or alpha_divergence. Only the losses built on the chosen-minus-rejected "
                          "score accept another than reverse_kl: sigmoid, sigmoid_norm, hinge, ipo, robust, "
                          "exo_pair, discopop (and the reference-free sft, which ignores it)."},
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "alpha of the alpha-divergence (f_divergence_type='alpha_divergence')."}
    )
    loss_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Deprecated: every loss hyperparameter is a field of this config; a key of loss_kwargs "
                          "that names one is moved to it with a warning, any other key is an error."},
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
        self._take_loss_kwargs()
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("loss_type 'exo_pair' needs DPOConfig.label_smoothing > 0 (the EXO paper uses 1e-3); "
                             "it is the epsilon of the smoothed target, and 0 makes the loss infinite")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        for name in ("rpo_alpha", "cpo_alpha"):  # weights of an NLL term: negative would push the chosen down
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be at least 0 (the weight of the chosen answers' NLL), got {value}")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be positive, got {self.discopop_tau}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; choose one of {list(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl":
            self._check_f_divergence(specs)
        super().__post_init__()

    def _take_loss_kwargs(self) -> None:
        """Move the keys of the deprecated ``loss_kwargs`` onto the fields of the same name (one mechanism)."""
        if not self.loss_kwargs:
            return
        known = {f.name for f in fields(self) if f.name in _LOSS_FIELDS}
        unknown = sorted(set(self.loss_kwargs) - known)
        if unknown:
            raise ValueError(f"loss_kwargs has keys no loss takes: {unknown}; the loss hyperparameters are the "
                             f"DPOConfig fields {sorted(known)}")
        defaults = {f.name: f.default for f in fields(self) if f.name in known}
        for key, value in self.loss_kwargs.items():
            current = getattr(self, key)
            if current != defaults[key] and current != value:
                raise ValueError(f"DPOConfig.{key}={current!r} and loss_kwargs[{key!r}]={value!r} disagree; "
                                 f"set only DPOConfig.{key}")
            setattr(self, key, value)
        warnings.warn(f"DPOConfig.loss_kwargs is deprecated: set the fields directly "
                      f"({', '.join(f'{k}={v!r}' for k, v in self.loss_kwargs.items())})", FutureWarning, stacklevel=3)
        self.loss_kwargs = None

    def _check_f_divergence(self, specs: list) -> None:
        """Refuse, at construction, an f-divergence that a chosen loss would refuse at its first step: each
        pairwise loss is asked on a one-pair batch (the loss itself knows whether it has an f-DPO form)."""
        if specs[0].listwise:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies to pairwise losses only; "
                             f"the listwise {self.loss_type} have no f-divergence form")
        if all(spec.reference_free for spec in specs):
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} changes the pull toward a reference, "
                             f"which the reference-free {self.loss_type} do not have; use 'reverse_kl'")
        one = torch.zeros(1)
        probe = PairLogps(one, one, one + 1, one + 1)
        for spec in specs:
            spec.fn(probe, None if spec.reference_free else probe, margin=None, **self.hyperparameters())

    @property
    def is_listwise(self) -> bool:
        return get_loss("preference", self.loss_type[0]).listwise

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and not all(get_loss("preference", n).reference_free for n in self.loss_type)

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments handed to every loss function (each ignores what it does not use)."""
        return {name: getattr(self, name) for name in _LOSS_FIELDS}


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
        # the reference: explicit, a frozen copy (full fine-tuning), the policy with its adapter off (LoRA), or none
        model, processing_class, ref_model = prepare_policy(
            model, processing_class, args, peft_config, ref_model,
            copy_reference=args.needs_reference and not args.precompute_ref_log_probs)

        self.loss_specs = [get_loss("preference", n) for n in args.loss_type]
        self.loss_weights = args.loss_weights or [1.0] * len(self.loss_specs)
        kinds = ("listwise",) if args.is_listwise else ("pairwise",)
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, processing_class, args, kinds=kinds)
        eval_dataset = prepare_eval_datasets(  # one dataset, or a dict of named ones
            eval_dataset, lambda data, name: prepare_dataset(data, processing_class, args, kinds=kinds, name=name))

        layout_cls = ListwiseCollator if args.is_listwise else PairwiseCollator
        base_collator = data_collator or layout_cls(processing_class.pad_token_id, layout=args.layout,
                                                    max_tokens_per_row=args.max_tokens_per_row)
        to_seq = _listwise_ref_sequences if args.is_listwise else _pairwise_ref_sequences
        self._per_row = _listwise_rows if args.is_listwise else _pairwise_rows

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
            self.eval_dataset = prepare_eval_datasets(self.eval_dataset, lambda data, _: self._precompute(data))

    # --- data ---------------------------------------------------------------------------------------------------
    @property
    def dataset_kinds(self) -> tuple[str, ...]:
        return ("listwise",) if self.args.is_listwise else ("pairwise",)

    def prepare_eval_dataset(self, data: Any, name: str = "eval_dataset") -> Dataset:
        """As ``__init__`` prepares ``eval_dataset``: tokenized and, with ``precompute_ref_log_probs``, with the
        reference log-probs computed (or read from the cache) for these rows."""
        data = super().prepare_eval_dataset(data, name)
        if self.args.needs_reference and self.args.precompute_ref_log_probs:
            check_reference_available(self.reference, data, trained=self.state.global_step > 0, name=name)
            data = self._precompute(data)
        return data

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
        self.store_metrics(metrics, weight=policy.seq_logps.shape[0])  # a short last batch weighs less
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
        return self._finish_loss(total, metrics, lambda: chosen_nll(pol), seq_logps, seq_lens, ref_seq)

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
        # the chosen answer of a list is its best-scored response
        return self._finish_loss(total, metrics, lambda: best_response_nll(pol, inputs["scores"], mask),
                                 seq_logps, seq_lens, ref_seq)

    def _finish_loss(self, total, metrics, chosen_nll_of, seq_logps, seq_lens, ref_seq):
        """``total`` plus ``rpo_alpha`` times the chosen answers' NLL (``chosen_nll_of()``, computed only when the
        term is on), and the k1 estimate of KL(policy || ref) per token on the data's completions."""
        if self.args.rpo_alpha:
            nll = chosen_nll_of()
            total = total + self.args.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        if ref_seq is not None:
            metrics["kl"] = ((seq_logps - ref_seq).sum() / seq_lens.sum().clamp(min=1)).detach()
        return total, metrics
