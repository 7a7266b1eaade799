"""RewardTrainer: a scalar reward model from pairwise, listwise or pointwise data.

Drop-in for TRL's ``RewardTrainer``: the same constructor arguments, config names (``max_length``,
``center_rewards_coefficient``, ``disable_dropout``, ...), dataset columns and logged metrics (``accuracy``,
``margin``, ``min_reward``, ``mean_reward``, ``max_reward``, ``num_tokens``). On top: listwise data
(``plackett_luce``, ``all_pairs``, with ``kendall_tau`` and ``ndcg``), pointwise scored data (``mse``),
packed and shared-prompt layouts, and a reward read at each sequence's real last token (its EOS) through
the batch's ``last_index``, so padding side, packing and ``pad == eos`` never move it.

>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> rows = [{"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " No."}] * 4
>>> args = RewardConfig(output_dir="/tmp/reward-doctest", max_steps=2, per_device_train_batch_size=2, report_to=[],
...                     bf16=False, save_strategy="no", disable_tqdm=True)
>>> trainer = RewardTrainer(build_tiny_llama(tok), args=args, train_dataset=rows, processing_class=tok)
>>> result = trainer.train()  # prints the run's summary
{'train_runtime': ...}
>>> result.global_step
2
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import set_seed

from hfrlhf.data.collators import ListwiseCollator, PairwiseCollator, PointwiseCollator
from hfrlhf.data.errors import DataError
from hfrlhf.losses import LossOutput, LossSpec, get_loss
from hfrlhf.models.loading import ModelArguments, load_reward_model, load_tokenizer, score_head
from hfrlhf.models.quantized import keep_4bit_weights_trainable
from hfrlhf.models.reward_head import reward_model_from_causal_lm, score_completions, sequence_rewards
from hfrlhf.trainers.base import (
    HfrlhfConfig,
    HfrlhfTrainer,
    attach_peft,
    disable_dropout,
    ensure_pad_token,
    prepare_dataset,
    prepare_eval_datasets,
)

__all__ = [
    "RewardConfig",
    "RewardTrainer",
    "compute_accuracy",
    "reward_model_from_causal_lm",
    "score_completions",
    "sequence_rewards",
]

logger = logging.getLogger(__name__)

# data kind -> (collator, canonical columns, for error messages)
_KINDS: dict[str, tuple[type, str]] = {
    "pairwise": (PairwiseCollator, "prompt, chosen, rejected (+ margin)"),
    "listwise": (ListwiseCollator, "prompt, responses, scores or ranks"),
    "pointwise": (PointwiseCollator, "prompt, completion, score"),
}


def _loss_kind(spec: LossSpec) -> str:
    """The data kind a reward loss trains on, from its capability flags."""
    if spec.listwise:
        return "listwise"
    return "pointwise" if "pointwise" in spec.needs else "pairwise"


def _losses_for(kind: str) -> list[str]:
    from hfrlhf.losses import available_losses

    return [n for n in available_losses("reward") if _loss_kind(get_loss("reward", n)) == kind]


@dataclass
class RewardConfig(HfrlhfConfig):
    """Configuration of :class:`RewardTrainer`; field names follow TRL's ``RewardConfig`` where TRL has them."""

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (TRL's reward default)."})
    loss_type: str = field(
        default="bradley_terry",
        metadata={"help": "bradley_terry (pairwise data), plackett_luce or all_pairs (listwise data), "
                          "mse (pointwise data: one completion with a score)."},
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of a penalty on mean squared (chosen + rejected) reward, pushing rewards to be "
                          "centred on zero (Eisenstein et al., 2023, eq. 2). Recommended: 0.01."},
    )
    loss_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Extra keyword arguments for the loss function."}
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when the model is given by name."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code shipped with a Hub repository when loading by name."}
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-sequence token appended to completions (default: the tokenizer's)."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad the batch length up to a multiple of this."}
    )

    def __post_init__(self) -> None:
        spec = get_loss("reward", self.loss_type)  # fails early on unknown names, listing the known ones
        if self.center_rewards_coefficient is not None:
            if self.center_rewards_coefficient < 0:
                raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
            if "center_rewards_coefficient" not in inspect.signature(spec.fn).parameters:
                raise ValueError(f"loss_type={self.loss_type!r} has no reward centring term; "
                                 "center_rewards_coefficient applies to bradley_terry")
        super().__post_init__()

    @property
    def data_kind(self) -> str:
        """``"pairwise"``, ``"listwise"`` or ``"pointwise"``: the data ``loss_type`` trains on."""
        return _loss_kind(get_loss("reward", self.loss_type))


# --- models ----------------------------------------------------------------------------------------------------
def _head_name(model: nn.Module) -> str:
    head = score_head(model)
    for name, module in model.named_modules():
        if module is head:
            return name.rsplit(".", 1)[-1]
    return "score"


def _reward_peft_config(peft_config: Any, head_name: str) -> Any:
    """A copy of ``peft_config`` for a sequence classifier whose score head is trained and saved with the adapter."""
    config = copy.deepcopy(peft_config)
    if getattr(config, "task_type", None) != "SEQ_CLS":
        if getattr(config, "task_type", None) is not None:
            warnings.warn(f"peft_config.task_type={config.task_type!r} changed to 'SEQ_CLS' for a reward model",
                          UserWarning, stacklevel=3)
        saved = list(config.modules_to_save or [])
        if head_name not in saved:
            warnings.warn(f"peft_config.modules_to_save lacks the score head {head_name!r}: added, so the head is "
                          "trained and saved with the adapter", UserWarning, stacklevel=3)
        config.task_type = "SEQ_CLS"
    config.modules_to_save = sorted(set(config.modules_to_save or []) | {head_name})
    return config


def _prepare_model(model: Any, args: RewardConfig) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """A reward model from a name, a sequence classifier or a causal LM; plus a tokenizer when loaded by name."""
    if isinstance(model, str):
        set_seed(args.seed)  # the new score head is random
        margs = ModelArguments(model_name_or_path=model, trust_remote_code=args.trust_remote_code)
        return load_reward_model(margs, **(args.model_init_kwargs or {})), load_tokenizer(model)
    if args.model_init_kwargs:
        logger.warning("model_init_kwargs is ignored: the model is already instantiated")
    try:
        score_head(model)
    except AttributeError:
        if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
            raise TypeError(f"{type(model).__name__} is neither a sequence classifier nor a causal LM") from None
        logger.info("turning %s into a one-label sequence classifier (new score head)", type(model).__name__)
        return reward_model_from_causal_lm(model), None
    num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
    if num_labels != 1:
        raise ValueError(f"the model has num_labels={num_labels}; a reward model outputs one scalar (num_labels=1)")
    return model, None


# --- data --------------------------------------------------------------------------------------------------------
def _tokenized_kind(columns: Sequence[str]) -> str | None:
    if "chosen_ids" in columns:
        return "pairwise"
    if "responses_ids" in columns:
        return "listwise"
    if "completion_ids" in columns and "score" in columns:
        return "pointwise"
    return None


def _peek_kind(data: Any) -> str | None:
    """The record kind of in-memory data, from its first row (None when it cannot be told cheaply)."""
    from datasets import Dataset

    from hfrlhf.data.formats import FORMATS, detect_format

    if isinstance(data, Dataset):
        if "prompt_ids" in data.column_names:
            return _tokenized_kind(data.column_names)
        first = data[:1]
        rows = [{k: v[0] for k, v in first.items()}] if len(data) else []
    elif isinstance(data, Sequence) and not isinstance(data, str) and data and isinstance(data[0], Mapping):
        rows = [data[0]]
    else:
        return None
    try:
        return FORMATS[detect_format(rows)].kind
    except ValueError:
        return None  # load() reports it, naming the row


def _count_tokens(features: Sequence[Mapping[str, Any]]) -> int:
    """Tokens of every prompt + completion sequence (a shared prompt counts once per completion, as in TRL)."""
    total = 0
    for f in features:
        completions = [f[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in f]
        completions += list(f.get("responses_ids") or [])
        total += sum(len(f["prompt_ids"]) + len(c) for c in completions)
    return total


class _WithTokenCount:
    """Wraps a collator and adds ``num_tokens`` (a 0-d long tensor) for TRL's ``num_tokens`` metric."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        batch["num_tokens"] = torch.tensor(_count_tokens(features))
        return batch


# --- trainer -----------------------------------------------------------------------------------------------------
class RewardTrainer(HfrlhfTrainer):
    """Train a scalar reward model with a loss from the ``"reward"`` registry (``args.loss_type``).

    Args:
        model: a one-label sequence classifier (the main path), a causal LM (turned into one that shares its
            decoder, see :func:`reward_model_from_causal_lm`), or a name/path loaded with ``load_reward_model``
            (``"smollm2-135m-instruct"`` for the bundled model).
        args: :class:`RewardConfig`.
        data_collator: default: the pairwise, listwise or pointwise collator for ``args.loss_type``'s data.
        train_dataset / eval_dataset: rows in any schema ``hfrlhf.data.load`` reads (a ``datasets.Dataset``, a
            list of rows, a path), or already tokenized records; ``eval_dataset`` may be a dict of them.
        processing_class: the tokenizer (loaded from the model's name when omitted); EOS is used as pad if unset.
        compute_metrics: receives an ``EvalPrediction`` whose ``predictions`` are rewards: ``(B, 2)`` [chosen,
            rejected] with ``label_ids`` 0 (pairwise; see :func:`compute_accuracy`), ``(P, K)`` with the scores
            as ``label_ids`` (listwise; NaN in missing slots), ``(S,)`` with the scores (pointwise).
        callbacks / optimizers: as for ``transformers.Trainer``.
        peft_config: a peft ``LoraConfig``; the score head is always in ``modules_to_save`` (added, with a
            warning, when the config lacks it), so it is trained and saved with the adapter.
    """

    _tag_names = ["hfrlhf", "reward-trainer"]

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        args: RewardConfig | None = None,
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
        args = args or RewardConfig(output_dir="reward-output")
        model, loaded_tok = _prepare_model(model, args)
        processing_class = processing_class or loaded_tok
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required when model is not given by name")
        if args.eos_token is not None:
            if args.eos_token not in processing_class.get_vocab():
                raise ValueError(f"eos_token {args.eos_token!r} is not in the tokenizer's vocabulary")
            processing_class.eos_token = args.eos_token
        ensure_pad_token(processing_class, model)  # also sets config.pad_token_id for HF's own pooling

        if peft_config is not None:
            model = attach_peft(model, _reward_peft_config(peft_config, _head_name(model)), args)
        keep_4bit_weights_trainable(model)
        if args.disable_dropout:
            disable_dropout(model)

        self.loss_spec = get_loss("reward", args.loss_type)
        self.data_kind = args.data_kind
        self.loss_kwargs = dict(args.loss_kwargs or {})
        if args.center_rewards_coefficient is not None:
            self.loss_kwargs["center_rewards_coefficient"] = args.center_rewards_coefficient
        self._kind_loss = {"pairwise": self._pairwise, "listwise": self._listwise, "pointwise": self._pointwise}

        train_dataset = self._prepare(train_dataset, processing_class, args, "train_dataset")
        eval_dataset = prepare_eval_datasets(  # one dataset, or a dict of named ones
            eval_dataset, lambda data, name: self._prepare(data, processing_class, args, name))
        if data_collator is None:
            collator_cls = _KINDS[self.data_kind][0]
            data_collator = _WithTokenCount(collator_cls(processing_class.pad_token_id, layout=args.layout,
                                                         pad_to_multiple_of=args.pad_to_multiple_of,
                                                         max_tokens_per_row=args.max_tokens_per_row))

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self._total_train_tokens = 0

    # --- data ---------------------------------------------------------------------------------------------------
    def _prepare(self, data: Any, tokenizer: PreTrainedTokenizerBase, args: RewardConfig, name: str) -> Any:
        """Load, validate and tokenize ``data`` for ``args.loss_type``; other data kinds are converted where the
        data layer has a conversion (e.g. listwise -> all ordered pairs), otherwise refused with a clear error."""
        if data is None:
            return None
        kind = _peek_kind(data)
        try:
            prepared = prepare_dataset(data, tokenizer, args, kinds=(self.data_kind,), name=name)
        except DataError as err:
            tokenized = "prompt_ids" in (getattr(data, "column_names", None) or ())
            other_kind = err.reason == "missing column" and tokenized and kind not in (None, self.data_kind)
            if err.reason != "wrong kind" and not other_kind:  # tokenized records of another kind are not converted
                raise
            raise ValueError(self._kind_message(name, kind)) from err
        have = _tokenized_kind(prepared.column_names)
        if have != self.data_kind:  # tokenized records pass through unconverted
            raise ValueError(self._kind_message(name, have))
        if kind is not None and kind != self.data_kind:
            logger.warning("%s: %s data converted to %d %s records for loss_type=%r", name, kind, len(prepared),
                           self.data_kind, self.loss_spec.name)
        return prepared

    def _kind_message(self, name: str, kind: str | None) -> str:
        fits = _losses_for(kind) if kind else []
        hint = f"; for {kind} data use loss_type in {fits}" if fits else ""
        return (f"{name}: loss_type={self.loss_spec.name!r} trains on {self.data_kind} data "
                f"({_KINDS[self.data_kind][1]}), but got {kind or 'other'} data, which does not convert to "
                f"{self.data_kind}{hint}")

    def prepare_eval_dataset(self, data: Any, name: str = "eval_dataset") -> Any:
        """A dataset given to ``evaluate()`` is loaded and tokenized like ``eval_dataset``."""
        return self._prepare(data, self.processing_class, self.args, name)

    # --- loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = sequence_rewards(model, inputs)  # (S,)
        out, predictions, labels = self._kind_loss[self.data_kind](rewards, inputs)
        loss = self.guard_loss(out.loss, model)
        self.store_metrics(out.metrics, weight=predictions.shape[0])  # pairs / prompts / sequences of this batch
        self._store_num_tokens(inputs)
        if return_outputs:
            return loss, {"rewards": rewards.detach(), "predictions": predictions, "labels": labels}
        return loss

    def _pairwise(self, rewards: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
        b = rewards.shape[0] // 2  # sequences 0..B-1 are chosen, B..2B-1 rejected
        chosen, rejected = rewards[:b], rewards[b:]
        out: LossOutput = self.loss_spec.fn(chosen, rejected, margin=inputs.get("margin"), **self.loss_kwargs)
        predictions = torch.stack([chosen, rejected], dim=1).detach()  # (B, 2)
        return out, predictions, torch.zeros(b, dtype=torch.long, device=rewards.device)

    def _listwise(self, rewards: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
        mask = inputs["response_mask"]  # (P, K)
        per_prompt = rewards[inputs["response_seq"].clamp(min=0)]  # (P, K)
        out = self.loss_spec.fn(per_prompt, inputs["scores"], mask, **self.loss_kwargs)
        nan = torch.full_like(per_prompt, math.nan)
        return out, torch.where(mask, per_prompt.detach(), nan), torch.where(mask, inputs["scores"], nan)

    def _pointwise(self, rewards: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
        out = self.loss_spec.fn(rewards, inputs["scores"], **self.loss_kwargs)
        return out, rewards.detach(), inputs["scores"]

    def _store_num_tokens(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """TRL's ``num_tokens``: tokens trained on so far (also logged, unchanged, at evaluation)."""
        count = inputs.get("num_tokens")
        if count is None:
            mask = inputs.get("attention_mask")
            if mask is None or mask.dim() != 2:
                return
            count = mask.sum()
        if self.model.training:
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(count.reshape(1)).sum().item())
        self._metrics[self._mode]["num_tokens"] = [float(self._total_train_tokens)]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss and, when ``compute_metrics`` is set, rewards as predictions (see the class docstring)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only or self.compute_metrics is None:
            return loss.detach(), None, None
        return loss.detach(), outputs["predictions"], outputs["labels"]


# --- evaluation and inference helpers ----------------------------------------------------------------------------
def compute_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` for pairwise evaluation: the fraction of pairs whose chosen reward is higher.

    ``eval_pred.predictions`` is ``(B, 2)`` [chosen, rejected] as :class:`RewardTrainer` returns it; a tie
    counts as wrong. Computed with the offline ``evaluate`` accuracy module in ``hfrlhf.metrics``.

    >>> compute_accuracy(EvalPrediction(predictions=np.array([[1.0, 0.0], [0.0, 2.0]]), label_ids=np.zeros(2)))
    {'accuracy': 0.5}
    """
    from hfrlhf.metrics import load_metric

    predictions = np.asarray(eval_pred.predictions)
    if predictions.ndim != 2 or predictions.shape[1] != 2:
        raise ValueError(f"compute_accuracy takes pairwise (B, 2) rewards, got shape {predictions.shape}")
    predicted = (predictions[:, 1] >= predictions[:, 0]).astype(np.int64)  # 0 = chosen ranked first
    references = np.asarray(eval_pred.label_ids).astype(np.int64).reshape(-1)
    return load_metric("accuracy").compute(predictions=predicted, references=references)
