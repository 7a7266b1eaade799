"""The steps every workflow shares, in the order a run takes them.

1. :func:`prepare`: logging, seed, the reporting integrations that are really installed, and the Hub
   settings taken out of the training arguments (the workflow pushes once at the end, the adapter only,
   with its own card; the token leaves the arguments so it is never saved with them).
2. :func:`load_policy` / :func:`load_reward`: tokenizer + model from ``ModelArguments`` (bundled model by
   default, 4/8-bit when asked, LoRA config from ``get_peft_config``).
3. :func:`evaluate_before`: held-out metrics before training, to compare with after.
4. :func:`finish`: save (adapter only with LoRA), trainer state and run config, model card, plot, merged
   model, push; returns a :class:`RunResult` and prints what the run learned and where it went.

:func:`train_and_finish` takes a run through all four for a trainer built the usual way (SFT, reward, DPO,
KTO); PPO, which also needs a reward, calls the steps itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from hfrlhf.hub import ModelCard, base_model_id, push_to_hub
from hfrlhf.models.loading import (
    ModelArguments,
    get_peft_config,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)
from hfrlhf.plotting import plot_log_history
from hfrlhf.trainers.base import HfrlhfConfig
from hfrlhf.workflows.args import SECRET_FIELDS, ScriptArguments, save_yaml

__all__ = ["HubTarget", "RunResult", "prepare", "load_policy", "load_reward", "evaluate_before", "finish",
           "merge_adapter", "print_summary", "train_and_finish"]

logger = logging.getLogger("hfrlhf.workflows")

PLOT_NAME = "training_curves.png"
CONFIG_NAME = "run_config.yaml"
MERGED_DIR = "merged"
_TIMING = ("runtime", "samples_per_second", "steps_per_second", "epoch", "total_flos", "preparation_time")
# the metrics a summary shows first, by suffix (train names; eval_ is prepended for held-out metrics)
_KEY_METRICS = ("rewards/accuracies", "accuracy", "rewards/margins", "margin", "loss", "kl", "objective/kl",
                "objective/scores", "lengths/mean", "eos_rate", "rewards/chosen", "rewards/rejected")


@dataclass
class HubTarget:
    """Where and how to push at the end of a run. The token is kept out of ``repr``."""

    repo_id: str
    token: str | None = field(default=None, repr=False)
    private: bool | None = None
    revision: str | None = None


@dataclass
class RunResult:
    """What a workflow leaves behind."""

    output_dir: str
    adapter: bool
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    plot: str | None = None
    merged_dir: str | None = None
    hub_url: str | None = None
    seconds: float = 0.0


def prepare(training_args: TrainingArguments) -> HubTarget | None:
    """Set up logging, the seed and reporting; take the Hub settings out of ``training_args``.

    ``report_to`` is honoured as given, except that ``tensorboard`` is dropped with a warning when the
    package is not installed. Returns the push target when ``--push_to_hub`` was given.
    """
    # hfrlhf's own messages at INFO on the main process; other libraries keep their usual WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    logging.getLogger("hfrlhf").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    reporters = list(training_args.report_to or [])
    if "tensorboard" in reporters and not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        warnings.warn("report_to includes tensorboard but it is not installed (pip install tensorboard): "
                      "not reporting to it", stacklevel=2)
        training_args.report_to = [r for r in reporters if r != "tensorboard"]

    target = None
    if training_args.push_to_hub:
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        target = HubTarget(repo_id, training_args.hub_token, training_args.hub_private_repo,
                           training_args.hub_revision)
    # The workflow pushes once at the end (adapter + card); the Trainer must not push checkpoints itself,
    # and the token must not be pickled into training_args.bin.
    training_args.push_to_hub = False
    for name in SECRET_FIELDS:
        setattr(training_args, name, None)
    return target


def _quantized(model_args: ModelArguments) -> bool:
    return model_args.load_in_4bit or model_args.load_in_8bit


def _device_map(model_args: ModelArguments) -> dict[str, Any]:
    """Quantized weights must be placed on this process's GPU when loading (one copy per process in DDP)."""
    if _quantized(model_args) and torch.cuda.is_available():
        from accelerate import PartialState

        return {"device_map": {"": PartialState().local_process_index}}
    return {}


def load_policy(model_args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Any]:
    """Causal LM, its tokenizer and the LoRA config (None without ``--use_peft``)."""
    tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
                               revision=model_args.model_revision)
    model = load_causal_lm(model_args, **_device_map(model_args))
    return model, tokenizer, get_peft_config(model_args)


def load_reward(model_args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Any]:
    """One-output sequence classifier, its tokenizer and a LoRA config that also trains the score head."""
    tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
                               revision=model_args.model_revision)
    model = load_reward_model(model_args, **_device_map(model_args))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, get_peft_config(model_args, task_type="SEQ_CLS")


def _clean(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not any(k.endswith(t) for t in _TIMING)}


def evaluate_before(trainer: Trainer, script_args: ScriptArguments) -> dict[str, float] | None:
    """Held-out metrics of the model before training (None without an eval set or ``eval_before_train``)."""
    if trainer.eval_dataset is None or not script_args.eval_before_train:
        return None
    logger.info("evaluating before training")
    return _clean(trainer.evaluate(metric_key_prefix="eval"))


def _hyperparameters(training_args: TrainingArguments, model_args: ModelArguments) -> dict[str, Any]:
    """The hyperparameters worth a card: the usual training ones, then the method's own config fields that
    were changed from their defaults (and ``beta`` / ``loss_type``, which readers always look for)."""
    shared = ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
              "max_grad_norm", "seed", "bf16", "fp16", "max_length", "max_prompt_length", "layout"]
    base_fields = {f.name for f in dataclasses.fields(HfrlhfConfig)}
    own = [f for f in dataclasses.fields(training_args) if f.name not in base_fields and f.init]
    out: dict[str, Any] = {}
    for name in shared:
        value = getattr(training_args, name, None)
        if value is None or value is False:
            continue
        if name == "max_steps" and value <= 0 or name == "num_train_epochs" and training_args.max_steps > 0:
            continue
        if name in ("warmup_steps", "weight_decay") and not value:
            continue
        out[name] = value.value if hasattr(value, "value") else value
    for f in own:
        value = getattr(training_args, f.name)
        if value is None or f.name.endswith("_token") or f.name in SECRET_FIELDS or isinstance(value, dict):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value != default or f.name in ("beta", "loss_type"):
            out[f.name] = value.value if hasattr(value, "value") else value
    out["total_train_batch_size"] = (training_args.per_device_train_batch_size
                                     * training_args.gradient_accumulation_steps * training_args.world_size)
    if model_args.use_peft:
        out.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                   lora_target_modules=model_args.lora_target_modules or "all-linear")
    if _quantized(model_args):
        out["quantization"] = "4-bit " + model_args.bnb_4bit_quant_type if model_args.load_in_4bit else "8-bit"
    return out


def _last_train_metrics(trainer: Trainer, train_output: Any) -> dict[str, float]:
    out = {}
    for entry in trainer.state.log_history:
        if "loss" in entry and "eval_loss" not in entry:
            out = {k: v for k, v in entry.items() if k not in ("epoch", "step", "learning_rate", "grad_norm")}
    if train_output is not None:
        out["train_loss"] = train_output.training_loss
    return _clean({k: v for k, v in out.items() if isinstance(v, (int, float))})


def merge_adapter(adapter_dir: str | os.PathLike[str], model_args: ModelArguments, out_dir: str | os.PathLike[str],
                  *, reward: bool = False, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Merge a saved LoRA adapter into its base and save the full model (safetensors) in ``out_dir``.

    The base is loaded again unquantized, so a QLoRA adapter is merged into full-precision weights rather
    than into the rounded 4-bit ones it was trained on top of.
    """
    from peft import PeftModel

    plain = dataclasses.replace(model_args, load_in_4bit=False, load_in_8bit=False)
    base = load_reward_model(plain) if reward else load_causal_lm(plain)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def finish(
    trainer: Trainer,
    method: str,
    script_args: ScriptArguments,
    training_args: TrainingArguments,
    model_args: ModelArguments,
    *,
    hub: HubTarget | None = None,
    metrics_before: dict[str, float] | None = None,
    train_output: Any = None,
    data_name: str | None = None,
    reward_model: bool = False,
    started: float | None = None,
) -> RunResult:
    """Save, evaluate, plot, merge and push after ``trainer.train()``; print the summary on the main process.

    ``trainer.save_model`` writes the adapter only under LoRA (PPO: the policy adapter, its critic in
    ``critic/``); the card, plot, merged model and push follow on the main process.
    """
    out = training_args.output_dir
    trainer.save_model(out)
    if metrics_before:  # train() starts a fresh log history: keep the evaluation before it, at step 0
        trainer.state.log_history.insert(0, {**metrics_before, "epoch": 0.0, "step": 0})
    trainer.save_state()
    adapter = os.path.isfile(os.path.join(out, "adapter_config.json"))
    result = RunResult(output_dir=out, adapter=adapter, metrics_before=metrics_before,
                       train_metrics=_last_train_metrics(trainer, train_output))
    if trainer.eval_dataset is not None:
        result.metrics_after = _clean(trainer.evaluate(metric_key_prefix="eval"))

    if trainer.is_world_process_zero():
        save_yaml(os.path.join(out, CONFIG_NAME), script_args, training_args, model_args)
        if script_args.plot:
            title = f"hfrlhf {method}: {Path(model_args.model_name_or_path).name}"
            result.plot = str(plot_log_history(trainer.state.log_history, os.path.join(out, PLOT_NAME), title=title))
        name = script_args.dataset_name
        dataset_id = name if name and not os.path.exists(name) else None  # a Hub id, not a local file
        card = ModelCard(
            method=method,
            base_model=base_model_id(model_args.model_name_or_path, script_args.base_model_id),
            adapter=adapter,
            datasets=[dataset_id] if dataset_id else [],
            hyperparameters=_hyperparameters(training_args, model_args),
            metrics=_ordered_dict(result.metrics_after or result.train_metrics),
            metrics_before=metrics_before if result.metrics_after else None,
            repo_id=hub.repo_id if hub else None,
            location=out,
            data_description=None if dataset_id else f"`{data_name or script_args.dataset_name}`",
            reward_model=reward_model,
            quantized=_quantized(model_args),
        )
        card.save(out)
        if script_args.merge_adapter:
            if adapter:
                result.merged_dir = str(merge_adapter(out, model_args, os.path.join(out, MERGED_DIR),
                                                      reward=reward_model, tokenizer=trainer.processing_class))
            else:
                logger.warning("merge_adapter: the run trained all weights (no LoRA adapter), nothing to merge")
        if hub is not None:
            result.hub_url = push_to_hub(out, hub.repo_id, token=hub.token, private=hub.private,
                                         revision=hub.revision, commit_message=f"hfrlhf {method}: {hub.repo_id}")
    if started is not None:
        result.seconds = time.time() - started
    if trainer.is_world_process_zero():
        print_summary(method, result, eval_rows=len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0)
    # under torchrun / accelerate launch: free the DDP wrapper, then destroy the process group, while the
    # interpreter is alive (see HfrlhfTrainer.end_training)
    trainer.end_training()
    return result


def _ordered(metrics: dict[str, float], prefix: str) -> list[str]:
    keys = [prefix + k for k in _KEY_METRICS if prefix + k in metrics]
    return keys or sorted(metrics)[:8]


def _ordered_dict(metrics: dict[str, float]) -> dict[str, float]:
    """The key metrics first (train or eval names), then the rest alphabetically."""
    first = [p + k for k in _KEY_METRICS for p in ("eval_", "") if p + k in metrics]
    return {k: metrics[k] for k in [*first, *sorted(set(metrics) - set(first))]}


def _size(path: str) -> str:
    total = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    return f"{total / 2**20:.1f} MB"


def print_summary(method: str, result: RunResult, *, eval_rows: int = 0) -> None:
    """Print what the run learned (held-out metrics before vs after) and where its outputs went."""
    minutes, seconds = divmod(int(round(result.seconds)), 60)
    lines = ["", f"== hfrlhf {method}: done" + (f" in {minutes}m {seconds:02d}s" if result.seconds else "") + " =="]
    if result.metrics_after:
        before = result.metrics_before or {}
        lines.append(f"held-out set ({eval_rows} rows never trained on)" if eval_rows else "held-out set")
        lines.append(f"  {'metric':<28}{'before':>10}{'after':>10}" if before else f"  {'metric':<28}{'after':>10}")
        for key in _ordered(result.metrics_after, "eval_"):
            after = result.metrics_after[key]
            if before:
                b = before.get(key)
                lines.append(f"  {key:<28}{(f'{b:.4f}' if b is not None else '-'):>10}{after:>10.4f}")
            else:
                lines.append(f"  {key:<28}{after:>10.4f}")
    elif result.train_metrics:
        lines.append("last logged training metrics")
        for key in _ordered(result.train_metrics, ""):
            lines.append(f"  {key:<28}{result.train_metrics[key]:>10.4f}")
    what = "LoRA adapter" if result.adapter else "model"
    lines.append(f"{what} saved to: {result.output_dir} ({_size(result.output_dir)} of weights)")
    if result.merged_dir:
        lines.append(f"merged full model: {result.merged_dir}")
    if result.plot:
        lines.append(f"training curves: {result.plot}")
    if result.hub_url:
        lines.append(f"pushed to: {result.hub_url}")
    print("\n".join(lines), flush=True)


def train_and_finish(
    method: str,
    trainer_cls: type[Trainer],
    script_args: ScriptArguments,
    training_args: TrainingArguments,
    model_args: ModelArguments,
    *,
    data_kind: str | tuple[str, ...],
    reward_model: bool = False,
) -> RunResult:
    """One whole run: steps 1 to 4 for ``trainer_cls`` (called as TRL's trainers are) on ``data_kind`` records.

    ``reward_model=True`` loads a one-output sequence classifier (a new score head, trained and saved with
    the adapter under LoRA) instead of a causal LM.
    """
    from hfrlhf.workflows.data import describe_source, load_splits, rows_named_in_source

    started = time.time()
    hub = prepare(training_args)

    # 1. model, tokenizer and LoRA config (with LoRA, DPO/KTO's reference is the policy with its adapter off)
    model, tokenizer, peft_config = (load_reward if reward_model else load_policy)(model_args)

    # 2. data of the kind the trainer's loss takes, with held-out rows when asked
    train_data, eval_data = load_splits(script_args, kind=data_kind, seed=training_args.seed,
                                        drop_invalid=getattr(training_args, "drop_invalid_rows", False))

    # 3. the trainer (a data error it raises names the row of the data source)
    with rows_named_in_source(script_args, {"train_dataset": train_data, "eval_dataset": eval_data}):
        trainer = trainer_cls(model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                              processing_class=tokenizer, peft_config=peft_config)

    # 4. held-out metrics before, training, then save / evaluate / plot / merge / push
    before = evaluate_before(trainer, script_args)
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return finish(trainer, method, script_args, training_args, model_args, hub=hub, metrics_before=before,
                  train_output=output, data_name=describe_source(script_args), reward_model=reward_model,
                  started=started)
