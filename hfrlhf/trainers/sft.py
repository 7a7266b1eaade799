"""SFTTrainer: supervised fine-tuning (stage 1) with a completion-only loss.

Drop-in for TRL's ``SFTTrainer`` on prompt-completion data (``prompt`` + ``completion``, or chat
``messages`` whose last assistant turn is the completion) and on language-modeling data (a lone ``text``
column, trained on every token but the first): the same constructor arguments and the
``completion_only_loss`` switch. The loss is the mean negative log-likelihood of the completion tokens;
prompt tokens carry no loss. Log-probs come from hidden states in chunks over the vocabulary
(:func:`hfrlhf.ops.logprobs.batch_logprobs`), so ``[B, T, vocab]`` logits are never materialised; the
batch is :class:`~hfrlhf.data.collators.SFTCollator`'s, whose scored tokens are exactly the tokens its
``labels`` (-100 elsewhere) mark.

>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> rows = [{"prompt": "Say hi.", "completion": " Hi there!"}] * 4
>>> args = SFTConfig(output_dir="/tmp/sft-doctest", max_steps=2, per_device_train_batch_size=2, report_to=[],
...                  bf16=False, save_strategy="no", logging_steps=1, disable_tqdm=True)
>>> trainer = SFTTrainer(build_tiny_llama(tok), args=args, train_dataset=rows, processing_class=tok)
>>> trainer.train().global_step
{'loss': ..., 'num_tokens': ...}
2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfrlhf.data.collators import SFTCollator
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.trainers.base import (
    HfrlhfConfig,
    HfrlhfTrainer,
    prepare_dataset,
    prepare_eval_datasets,
    prepare_policy,
)

__all__ = ["SFTConfig", "SFTTrainer", "WholeSequenceCollator"]

_KINDS = ("sft", "text")  # record kinds SFT trains on: prompt-completion records and language-modeling text


@dataclass
class SFTConfig(HfrlhfConfig):
    """Configuration of :class:`SFTTrainer`; field names follow TRL's ``SFTConfig`` where TRL has them."""

    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (TRL's SFT default)."})
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Train on completion tokens only (prompt tokens masked). False: every token but the first."},
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Turn dropout off in the model."})
    packing: bool = field(
        default=False,
        metadata={"help": "TRL's name for layout='packed': several records per row, isolated by a block mask."},
    )

    def __post_init__(self) -> None:
        if self.packing:
            self.layout = "packed"
        if self.layout not in SFTCollator.allowed_layouts:
            raise ValueError(f"SFT supports layouts {SFTCollator.allowed_layouts}, got {self.layout!r} "
                             "(one completion per prompt: a shared prompt saves nothing)")
        super().__post_init__()


class WholeSequenceCollator(SFTCollator):
    """:class:`SFTCollator` that scores the prompt too (``completion_only_loss=False``).

    Each record is laid out as if its first token were the prompt and everything after it the completion,
    so every token but the first (which has no predecessor) is scored; positions and masks are unchanged.

    >>> batch = WholeSequenceCollator(pad_token_id=0, index_keys=False)([{"prompt_ids": [5, 6], "completion_ids": [7, 2]}])
    >>> batch["labels"]
    tensor([[-100,    6,    7,    2]])
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        whole = []
        for f in features:
            ids = [*f["prompt_ids"], *f["completion_ids"]]
            whole.append({"prompt_ids": ids[:1], "completion_ids": ids[1:]})
        return super().__call__(whole)


class SFTTrainer(HfrlhfTrainer):
    """Supervised fine-tuning on prompt-completion data with a completion-only loss.

    Args:
        model: a causal LM, or a name/path (``"smollm2-135m-instruct"`` for the bundled model).
        args: :class:`SFTConfig`.
        train_dataset / eval_dataset: ``prompt`` + ``completion`` records (text or chat messages), chat
            ``messages``, language-modeling ``text`` rows (every token but the first is trained on), or anything
            ``hfrlhf.data.load`` reads as such (a Dataset, a list of rows, a path).
        processing_class: the tokenizer (loaded from the model's name when omitted).
        peft_config: a peft ``LoraConfig`` to train an adapter instead of all weights.

    Logged metrics: ``loss`` (mean NLL per scored token) and ``num_tokens`` (tokens seen so far, this
    process's inputs times the number of processes, as TRL counts them).
    """

    _tag_names = ["hfrlhf", "sft"]
    dataset_kinds = _KINDS  # datasets given to evaluate() are prepared like eval_dataset

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        args: SFTConfig | None = None,
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
        args = args or SFTConfig(output_dir="sft-output")
        model, processing_class, _ = prepare_policy(model, processing_class, args, peft_config)
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, processing_class, args, kinds=_KINDS)
        eval_dataset = prepare_eval_datasets(  # one dataset, or a dict of named ones
            eval_dataset,
            lambda data, name: prepare_dataset(data, processing_class, args, kinds=_KINDS, name=name))
        collator_cls = SFTCollator if args.completion_only_loss else WholeSequenceCollator
        data_collator = data_collator or collator_cls(processing_class.pad_token_id, layout=args.layout,
                                                      max_tokens_per_row=args.max_tokens_per_row)
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
        self._num_tokens = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean negative log-likelihood of the scored (completion) tokens of this micro-batch."""
        out = batch_logprobs(model, inputs, chunk_size=self.args.logprob_chunk_size)
        loss = -out.token_logps.mean()  # (N,) -> (): every scored token weighs the same
        loss = self.guard_loss(loss, model)
        metrics: dict[str, torch.Tensor | float] = {}
        if self.model.training:
            mask = inputs["attention_mask"]
            # a 4D mask means packed rows: count their slots, which are nearly all real tokens
            seen = float(mask.shape[0] * mask.shape[-1]) if mask.dim() == 4 else float(mask.sum())
            self._num_tokens += seen * self.accelerator.num_processes
            metrics["num_tokens"] = self._num_tokens
        self.store_metrics(metrics)
        return (loss, {"token_logps": out.token_logps}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # num_tokens is a running count: report the latest value, not the mean over the step's micro-batches
        counts = self._metrics["train"].get("num_tokens")
        if counts:
            self._metrics["train"]["num_tokens"] = [counts[-1]]
        super().log(logs, start_time)
