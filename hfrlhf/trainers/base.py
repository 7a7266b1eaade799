"""What every hfrlhf trainer shares: config defaults, data preparation, metric averaging, LoRA attachment,
bf16 autocast, the non-finite loss and gradient guards, and resuming only from complete checkpoints.
Trainers subclass :class:`HfrlhfTrainer` and only orchestrate.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hfrlhf.data.errors import DataError
from hfrlhf.models.loading import bf16_supported
from hfrlhf.ops.casts import shared_weight_casts

logger = logging.getLogger(__name__)


@dataclass
class HfrlhfConfig(TrainingArguments):
    """Fields shared by every hfrlhf config, on top of ``transformers.TrainingArguments``.

    Defaults differ from ``TrainingArguments`` where RLHF needs it: ``remove_unused_columns=False`` (the
    collators read columns the model's forward does not take), ``logging_steps=10``, ``bf16`` on where the
    hardware supports it, gradient checkpointing off (on small models it costs time for memory nobody needs),
    and, without a GPU, ``use_cpu=True`` and ``dataloader_pin_memory=False``. ``hub_token`` is hidden from
    ``repr`` and left out when the config is pickled (the Trainer pickles it into every checkpoint).
    """

    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: collators need columns the model's forward does not take."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Default: on where the device supports bf16 (CPUs with AVX512-BF16/AMX too)."},
    )
    gradient_checkpointing: bool | None = field(
        default=False,
        metadata={"help": "Recompute activations in backward: less memory, about 20-30% more time "
                          "(the same switch as activation_checkpointing, which wins when both are set)."},
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum tokens of prompt + completion; completions are cut to fit."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum prompt tokens; longer prompts keep their end."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenize the dataset."})
    drop_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Drop rows that fail validation (with a report) instead of stopping with an error."},
    )
    layout: str = field(
        default="padded",
        metadata={"help": "Batch layout: padded, packed (no padding) or shared_prompt (prompt once per pair).",
                  "choices": ["padded", "packed", "shared_prompt"]},
    )
    max_tokens_per_row: int | None = field(
        default=None,
        metadata={"help": "Row capacity of the packed and shared_prompt layouts. packed: sequences per row (default: the "
                          "longest sequence). shared_prompt: when set, prompts with their completions are packed "
                          "several to a row (less padding; one longer attention per row); default: one per row."},
    )
    logprob_chunk_size: int = field(
        default=1024, metadata={"help": "Scored tokens per chunk when computing log-probs over the vocabulary."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the policy (and reference)."})
    hub_token: str | None = field(
        default=None,
        repr=False,  # never shown by repr(), and dropped when the config is pickled (see __getstate__)
        metadata={"help": "Token used to push to the Hub (default: the one saved by `hf auth login`). Never "
                          "printed, logged, or written with the saved arguments."},
    )
    nonfinite_loss: str = field(
        default="skip",
        metadata={"help": "What to do on a NaN/inf loss or gradient: 'skip' the micro-batch (loss) or the optimizer "
                          "step (gradients) with a warning, counted in the logged 'nonfinite_skipped' and "
                          "'nonfinite_grad_skipped'; or 'raise' naming the step.", "choices": ["skip", "raise"]},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_supported()
        if not accelerator_available():
            # Without a GPU: CPU explicitly (TrainingArguments refuses bf16 otherwise, and under torchrun processes
            # would not join one process group without it), and no pinned memory (it only helps host-to-GPU copies).
            self.use_cpu = True
            self.dataloader_pin_memory = False
        # `gradient_checkpointing` is a deprecated alias in transformers: hand its value to the new name ourselves
        # so that setting it (or its default) raises no FutureWarning; transformers then mirrors the two.
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                "to leave room for the completion"
            )
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be positive, got {self.max_tokens_per_row}")
        if self.nonfinite_loss not in ("skip", "raise"):
            raise ValueError(f"nonfinite_loss must be 'skip' or 'raise', got {self.nonfinite_loss!r}")
        super().__post_init__()

    def __getstate__(self) -> dict[str, Any]:
        # The Trainer pickles its arguments into every checkpoint (training_args.bin): leave the token out.
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state


def accelerator_available() -> bool:
    """True when a CUDA, XPU or MPS device is present."""
    if torch.cuda.is_available():
        return True
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_is_complete(path: str | os.PathLike) -> bool:
    """True when the checkpoint folder ``path`` was written to the end.

    The Trainer writes ``trainer_state.json`` last (after weights, optimizer, scheduler and RNG states), so a
    folder whose state file is missing or not valid JSON was cut short, e.g. by a process killed while saving.
    """
    state = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return False
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` folder of ``folder`` with the largest N that is complete, or None.

    Unlike ``transformers.trainer_utils.get_last_checkpoint``, a partially written folder is never chosen:
    it is skipped with a warning.
    """
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    for _, path in sorted(found, reverse=True):
        if checkpoint_is_complete(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (no valid %s: it was not written to the end)",
                       path, TRAINER_STATE_NAME)
    return None


class NonFiniteGradientGuard(TrainerCallback):
    """Checks the gradients before every optimizer step and skips the step (``nonfinite_loss='skip'``) or raises.

    Skipping sets every gradient to None, so the optimizer leaves parameters and its moments untouched (a zero
    gradient would still move them through momentum and weight decay).
    """

    def __init__(self, trainer: HfrlhfTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.check_gradients()


def prepare_dataset(
    data: Any,
    tokenizer: PreTrainedTokenizerBase,
    args: HfrlhfConfig,
    *,
    kinds: tuple[str, ...],
    name: str = "train_dataset",
) -> Dataset:
    """Load (any supported schema), validate and tokenize ``data`` for a trainer that accepts ``kinds``.

    Already tokenized datasets (with ``prompt_ids``) are checked (:func:`hfrlhf.data.tokenize.check_tokenized`)
    and pass through unchanged.
    """
    from hfrlhf.data.formats import convert_kind, load, record_kind
    from hfrlhf.data.tokenize import check_tokenized, tokenize_dataset

    if isinstance(data, Dataset) and "prompt_ids" in data.column_names:
        if len(data) == 0:
            raise ValueError(f"{name} is empty: there is nothing to train or evaluate on")
        check_tokenized(data, len(tokenizer), source=name, kinds=kinds)
        return data

    loaded = records = load(data, drop_invalid=args.drop_invalid_rows)
    have = record_kind(records)
    if have not in kinds:
        # e.g. listwise rows for a pairwise loss become all ordered pairs; a clear error when no conversion exists
        records = convert_kind(records, kinds[0])
        if len(records) == 0:
            need = "two responses with different scores (ties never make a pair)" if kinds[0] == "pairwise" else (
                "two distinct completions")
            raise ValueError(f"{name} is empty after converting its {len(loaded)} {have} rows to {kinds[0]} records: "
                             f"no prompt has {need}")
    if len(records) == 0:
        raise ValueError(f"{name} is empty: there is nothing to train or evaluate on")
    if record_kind(records) == "listwise" and not any(len(set(scores)) > 1 for scores in records["scores"]):
        raise ValueError(f"{name}: every row's scores tie, so a ranking loss has nothing to learn from (ties never "
                         "make a pair); give rows whose responses are scored differently")
    source = os.fspath(data) if isinstance(data, (str, os.PathLike)) else name
    with args.main_process_first(desc=f"tokenizing {name}"):
        try:
            tokenized = tokenize_dataset(
                records,
                tokenizer,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                drop_invalid=args.drop_invalid_rows,
                num_proc=args.dataset_num_proc,
                source=source,
            )
        except DataError as err:
            if records is not loaded and err.row is not None:
                # the row is one of the converted records: name the source row it came from instead
                err.row = _row_with_prompt(loaded, records[err.row]["prompt"])
                err.message += f" (in the {kinds[0]} records made from this row)"
            raise
    if len(tokenized) == 0:
        raise ValueError(
            f"{name} is empty after tokenization: every row's prompt left no room for a completion within "
            f"max_length={args.max_length}; raise max_length or set max_prompt_length"
        )
    return tokenized


def _row_with_prompt(records: Dataset, prompt: Any) -> int | None:
    """Index of the first record whose prompt is ``prompt`` (conversions keep prompts as they are)."""
    for i, value in enumerate(records["prompt"]):
        if value == prompt:
            return i
    return None


def prepare_eval_datasets(data: Any, prepare: Callable[[Any, str], Any], name: str = "eval_dataset") -> Any:
    """``prepare(data, name)``; for a dict of named datasets (as ``transformers.Trainer`` takes for
    ``eval_dataset``) a dict of each one prepared, every one before any is used, and a bad row's error names
    its dataset (``eval_dataset['held_out']: rows: row 5, ...``)."""
    if data is None or not isinstance(data, Mapping):
        return None if data is None else prepare(data, name)
    out = {}
    for key, value in data.items():
        label = f"{name}[{key!r}]"
        try:
            out[key] = prepare(value, label)
        except DataError as err:
            if not (err.source or "").startswith(label):  # tokenization errors already name the dataset
                err.source = f"{label}: {err.source}" if err.source else label
            raise
    return out


@contextlib.contextmanager
def seeded_init(seed: int):
    """Draw the weights created inside the block from ``seed`` alone, leaving the process's random state as it was.

    A trainer's fresh adapter is then the same for the same ``args.seed`` whatever ran before it in the process
    (another trainer, a sampling pass), and the random numbers drawn after it (data order, dropout, sampling) do
    not depend on whether an adapter was created.

    >>> with seeded_init(3):
    ...     a = torch.rand(2)
    >>> _ = torch.rand(5)
    >>> with seeded_init(3):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b))
    True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def attach_peft(model: PreTrainedModel, peft_config: Any, args: HfrlhfConfig) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter from ``peft_config`` (k-bit models are prepared for training first),
    its initial weights drawn from ``args.seed`` (:func:`seeded_init`)."""
    if peft_config is None:
        return model
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if isinstance(model, PeftModel):
        raise ValueError("the model already carries a peft adapter; pass either a PeftModel or peft_config, not both")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    with seeded_init(args.seed):
        return get_peft_model(model, peft_config)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (policy-gradient and preference losses assume deterministic forwards)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token when it has none: its EOS token, as TRL's trainers do (Llama tokenizers
    ship without one). The tokenizer is changed in place, so a saved tokenizer pads the same way; a model whose
    config (and generation config) has no ``pad_token_id`` is given the tokenizer's.

    Padding is never scored: every collator builds its masks from sequence lengths, not from ``pad_token_id``,
    so an EOS that doubles as pad is still trained on where it ends a completion.

    >>> from hfrlhf.models.tiny import build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> tok.pad_token = None
    >>> ensure_pad_token(tok).pad_token == tok.eos_token
    True
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def prepare_policy(
    model: PreTrainedModel | nn.Module | str,
    processing_class: PreTrainedTokenizerBase | None,
    args: HfrlhfConfig,
    peft_config: Any = None,
    ref_model: PreTrainedModel | nn.Module | str | None = None,
    *,
    copy_reference: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase, nn.Module | None]:
    """What every causal-LM trainer does first: returns ``(model, tokenizer, ref_model)``.

    A model given by name is loaded with its tokenizer (unless ``processing_class`` is given), a reference
    given by name is loaded too; the tokenizer gets a pad token (:func:`ensure_pad_token`), ``peft_config``
    attaches a LoRA adapter (:func:`attach_peft`). With ``copy_reference`` and no ``ref_model``, a model
    without an adapter gets a frozen copy of itself as the reference (full fine-tuning: the reference is the
    policy as it starts; with an adapter the reference is the policy with its adapter off, no copy). The
    reference is frozen and put in eval mode; with ``args.disable_dropout`` dropout is off in both.
    """
    from hfrlhf.models.loading import load_causal_lm, load_tokenizer
    from hfrlhf.models.quantized import keep_4bit_weights_trainable
    from hfrlhf.trainers.reference import is_peft_model

    if isinstance(model, str):
        processing_class = processing_class or load_tokenizer(model)
        model = load_causal_lm(model)
    if isinstance(ref_model, str):
        ref_model = load_causal_lm(ref_model)
    if ref_model is not None and ref_model is model:
        raise ValueError("model and ref_model are the same object; omit ref_model to use a frozen copy")
    if processing_class is None:
        raise ValueError("processing_class (the tokenizer) is required when model is not given by name")
    ensure_pad_token(processing_class, model)
    model = attach_peft(model, peft_config, args)
    for m in (model, ref_model):
        if m is not None:
            keep_4bit_weights_trainable(m)
    if ref_model is None and copy_reference and not is_peft_model(model):
        ref_model = copy.deepcopy(model)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    for m in (model, ref_model):
        if m is not None and args.disable_dropout:
            disable_dropout(m)
    return model, processing_class, ref_model


class HfrlhfTrainer(Trainer):
    """A ``transformers.Trainer`` with per-step metric averaging, bf16 autocast and a non-finite loss guard.

    ``evaluate(eval_dataset=...)`` accepts what the constructor's ``eval_dataset`` accepts: each dataset given
    there goes through :meth:`prepare_eval_dataset`, which subclasses override to prepare it as ``__init__``
    does (tokenizing, KL partners, cached reference log-probs).
    """

    dataset_kinds: tuple[str, ...] = ()
    """Record kinds the default :meth:`prepare_eval_dataset` converts rows to (``prepare_dataset``'s ``kinds``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # items (pairs, prompts, sequences) behind each stored value, so a short last batch is not over-weighted
        self._metric_weights: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite_skipped = 0
        self.nonfinite_grad_skipped = 0
        self._skipped_in_step = 0  # micro-batches of the current optimizer step skipped for a non-finite loss
        self.add_callback(NonFiniteGradientGuard(self))
        # Our losses are means over the micro-batch: the Trainer divides by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    # --- precision -------------------------------------------------------------------------------------------
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> AbstractContextManager:
        """Run compute_loss under the accelerator's autocast (bf16 on CPU too): our log-prob path calls the
        decoder directly, so the autocast that accelerate wraps around ``model.forward`` would not apply."""
        return self.accelerator.autocast()

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """``Trainer``'s context around ``compute_loss`` (autocast), plus one low-precision copy per frozen weight
        for all the forwards of the step (:mod:`hfrlhf.ops.casts`)."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(shared_weight_casts())
        return stack

    # --- metrics ---------------------------------------------------------------------------------------------
    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def store_metrics(self, metrics: dict[str, torch.Tensor | float], *, mode: str | None = None,
                      weight: float = 1.0) -> None:
        """Record this micro-batch's metrics, averaged over processes; ``log()`` averages them over the step,
        each value weighted by ``weight`` (the items it is a mean over: pass the batch's pairs or rows)."""
        mode = mode or self._mode
        if not metrics:
            return
        names = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().reshape(()).to(self.accelerator.device)
                              for k in names])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values[None]).nanmean(0)
        for name, value in zip(names, values.tolist()):
            if value == value:  # drop NaN (e.g. a metric of a kind absent from this batch)
                self._metrics[mode][name].append(value)
                self._metric_weights[mode][name].append(float(weight))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step's averaged stored metrics to ``logs``. In evaluation a value already in ``logs`` (from
        ``compute_metrics``, exact over the whole set) wins over the batch average of a stored metric."""
        mode = "train" if self.model.training else "eval"
        averaged = {}
        for k, v in self._metrics[mode].items():
            w = self._metric_weights[mode].get(k, [])
            if len(w) != len(v):  # values stored without store_metrics (e.g. a running count): plain mean
                w = [1.0] * len(v)
            if v:
                averaged[k] = sum(x * y for x, y in zip(v, w)) / sum(w)
        if mode == "eval":
            prefix = getattr(self, "_eval_prefix", "eval")
            for key, value in averaged.items():
                logs.setdefault(f"{prefix}_{key}", value)
        else:
            if self.nonfinite_skipped:
                averaged["nonfinite_skipped"] = float(self.nonfinite_skipped)
            if self.nonfinite_grad_skipped:
                averaged["nonfinite_grad_skipped"] = float(self.nonfinite_grad_skipped)
            logs.update(averaged)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        self._metric_weights[mode].clear()

    # --- safety ----------------------------------------------------------------------------------------------
    def guard_loss(self, loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Return ``loss`` when finite; otherwise skip (a zero loss with zero gradients) or raise, per config."""
        if torch.isfinite(loss).all():
            return loss
        step = self.state.global_step
        if self.args.nonfinite_loss == "raise":
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at global step {step}: check the learning rate, the data of this "
                "batch, and fp16 overflow; set nonfinite_loss='skip' to skip such batches instead"
            )
        self.nonfinite_skipped += 1
        if model.training:
            self._skipped_in_step += 1
        warnings.warn(f"non-finite loss at global step {step}: batch skipped ({self.nonfinite_skipped} so far)",
                      RuntimeWarning, stacklevel=2)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in trainable), torch.zeros((), device=loss.device))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """``Trainer.training_step``; when a non-finite loss stops training, the offending micro-batch is saved
        (as safetensors, in ``output_dir``) and the error says where, so the batch can be replayed."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except FloatingPointError as err:
            path = self._save_batch(inputs, f"nonfinite-batch-step{self.state.global_step}")
            if path is None:
                raise
            raise FloatingPointError(f"{err}. The micro-batch is saved to {path}") from err

    def _save_batch(self, inputs: dict[str, Any], name: str) -> str | None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            return None
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, f"{name}-rank{self.args.process_index}.safetensors")
        save_file(tensors, path)
        return path

    def check_gradients(self) -> bool:
        """Before an optimizer step: True when the step should proceed. False when every micro-batch of the step
        had a skipped non-finite loss, or when a gradient is non-finite and ``nonfinite_loss='skip'`` (then the
        gradients are dropped, with a warning, counted in ``nonfinite_grad_skipped``); raises under 'raise'."""
        # Every micro-batch of this step was skipped (on every process): step nothing, not even momentum.
        skipped = torch.tensor(float(self._skipped_in_step >= self.args.gradient_accumulation_steps),
                               device=self.accelerator.device)
        self._skipped_in_step = 0
        if self.accelerator.num_processes > 1:
            skipped = self.accelerator.reduce(skipped, "sum") / self.accelerator.num_processes
        if skipped.item() == 1.0:
            for p in self.model.parameters():
                p.grad = None
            return False
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return True
        step = self.state.global_step
        if self.args.nonfinite_loss == "raise":
            raise FloatingPointError(
                f"non-finite gradient before the optimizer step of global step {step} (the loss was finite): "
                "check the learning rate, the data of this step's batches, and fp16 overflow; set "
                "nonfinite_loss='skip' to skip such steps instead"
            )
        self.nonfinite_grad_skipped += 1
        warnings.warn(f"non-finite gradient at global step {step}: optimizer step skipped "
                      f"({self.nonfinite_grad_skipped} so far)", RuntimeWarning, stacklevel=2)
        for p in self.model.parameters():
            p.grad = None
        return False

    # --- checkpoints -----------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` picks the last *complete* checkpoint of
        ``output_dir`` (a folder cut short by a kill during saving is skipped), and an explicit path to an
        incomplete checkpoint is refused."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint found in output_dir ({self.args.output_dir}) to resume from")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and not checkpoint_is_complete(resume_from_checkpoint):
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} is incomplete or missing (no valid {TRAINER_STATE_NAME}): it was "
                "not written to the end; resume from an earlier checkpoint or with resume_from_checkpoint=True"
            )
        elif not resume_from_checkpoint and self.args.should_save and os.path.isdir(self.args.output_dir):
            old = sorted(n for n in os.listdir(self.args.output_dir) if _CHECKPOINT_RE.match(n))
            if old:
                logger.warning(
                    "output_dir %s already holds checkpoints from an earlier run (%s): this run starts from scratch "
                    "and overwrites those of the same step; pass resume_from_checkpoint=True to continue instead, "
                    "or use an empty output_dir", self.args.output_dir, ", ".join(old))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def end_training(self) -> None:
        """Finish a multi-process run cleanly; call it once, when done with training (a no-op in one process
        but for a garbage collection).

        Waits for every process, drops the distributed wrapper of the model (its gradient reducer keeps the
        process group alive), then destroys the process group. Destroying the group while the wrapper lives,
        or leaving both to the interpreter's shutdown, can abort a finished gloo run at exit ("terminate called
        without an active exception", exit code -6). The trained model stays in ``trainer.model``, to save or
        use; evaluate before this call in a multi-process run (gathering metrics needs the process group).
        """
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self.model_wrapped = self.model
        accelerator.free_memory()  # the accelerator's references to the wrapped model, optimizer and loaders
        gc.collect()  # the wrapper's hooks form reference cycles: free it (and its reducer) now
        accelerator.end_training()

    # --- evaluation -------------------------------------------------------------------------------------------
    def prepare_eval_dataset(self, data: Any, name: str = "eval_dataset") -> Dataset:
        """Load, validate and tokenize one dataset given to :meth:`evaluate`, as ``__init__`` prepares
        ``eval_dataset``. The default converts rows to :attr:`dataset_kinds`; without them only already
        tokenized datasets are taken."""
        if self.dataset_kinds:
            return prepare_dataset(data, self.processing_class, self.args, kinds=self.dataset_kinds, name=name)
        if isinstance(data, Dataset) and "prompt_ids" in data.column_names:
            return data
        raise TypeError(
            f"{type(self).__name__} cannot prepare a {type(data).__name__} given to evaluate(): pass it as "
            "eval_dataset to the constructor, or pass tokenized records"
        )

    def _names_eval_dataset(self, data: Any) -> bool:
        """True when ``data`` is the name of one of the constructor's eval datasets (a string that is not a key
        of a dict ``eval_dataset`` is read as a path)."""
        return isinstance(data, str) and isinstance(self.eval_dataset, Mapping) and data in self.eval_dataset

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate``; ``eval_dataset`` takes what the constructor takes: rows in any schema
        ``hfrlhf.data.load`` reads (a list of dicts, a ``datasets.Dataset``, a path), tokenized records, or a dict
        of them, evaluated one by one with metrics prefixed ``{metric_key_prefix}_{name}_``. A string that names
        one of the constructor's eval datasets selects it."""
        if eval_dataset is None or self._names_eval_dataset(eval_dataset):
            if eval_dataset is not None or not isinstance(self.eval_dataset, Mapping):
                return self._evaluate_one(eval_dataset, ignore_keys, metric_key_prefix)
            datasets = {name: name for name in self.eval_dataset}  # already prepared: pass their names
        elif isinstance(eval_dataset, Mapping):  # every dataset prepared (and so validated) before any is evaluated
            datasets = prepare_eval_datasets(eval_dataset, self.prepare_eval_dataset)
        else:
            return self._evaluate_one(self.prepare_eval_dataset(eval_dataset), ignore_keys, metric_key_prefix)
        metrics: dict[str, float] = {}
        for name, data in datasets.items():
            metrics.update(self._evaluate_one(data, ignore_keys, f"{metric_key_prefix}_{name}"))
        return metrics

    def _evaluate_one(self, eval_dataset: Dataset | str | None, ignore_keys: list[str] | None,
                      metric_key_prefix: str) -> dict[str, float]:
        """Evaluate one prepared dataset (or the constructor's, by name or None)."""
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """``Trainer.evaluation_loop``, remembering ``metric_key_prefix`` so that ``log()`` names the stored
        metrics of a named eval dataset ``eval_{name}_{metric}`` like the loss."""
        self._eval_prefix = metric_key_prefix
        return super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                       ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the training loss (and stores eval metrics); there are no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
