"""PPOTrainer: RLHF stage 3, on-policy optimisation against a reward model or a Python reward function.

One Trainer step is one PPO iteration: sample responses to a batch of prompts, score them, then take
``num_ppo_epochs`` passes of clipped updates over ``num_mini_batches`` mini-batches. Checkpoints, callbacks,
logging, ``push_to_hub`` and accelerate work as for any ``transformers.Trainer``. The stages are the
functions of ``hfrlhf.ops.rollout``; the critic and the one-base-model LoRA layout are ``hfrlhf.models.value``.

>>> import tempfile
>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> args = PPOConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=2, response_length=4,
...                  report_to=[], bf16=False, save_strategy="no", num_sample_generations=0)
>>> reward = lambda prompts, completions: [float(len(c)) for c in completions]
>>> trainer = PPOTrainer(args, tok, build_tiny_llama(tok), reward_model=reward, train_dataset=[{"prompt": "Hi"}] * 2)
>>> from transformers import PrinterCallback, ProgressCallback
>>> trainer.remove_callback(PrinterCallback); trainer.remove_callback(ProgressCallback)  # quiet logs in a doctest
>>> trainer.train().global_step
1
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import skip_first_batches
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import has_length, set_seed

from hfrlhf.data.collators import SFTCollator
from hfrlhf.data.formats import load
from hfrlhf.data.tokenize import check_tokenized
from hfrlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from hfrlhf.models.quantized import keep_4bit_weights_trainable
from hfrlhf.models.value import ActorCritic, attach_shared_lora, build_critic, unwrap
from hfrlhf.ops.casts import shared_weight_casts
from hfrlhf.ops.kl import AdaptiveKLController, FixedKLController
from hfrlhf.ops.masked import RunningMoments
from hfrlhf.ops.rollout import (
    ADVANTAGE_ESTIMATORS,
    RewardScorer,
    Rollout,
    RolloutCollator,
    compute_advantages,
    generate,
    make_generation_config,
    reference_logps,
    sequence_batch,
    shape_scores,
    to_grid,
    token_kl,
    truncate_at_stop,
    update_loss,
)
from hfrlhf.trainers.base import (
    HfrlhfConfig,
    HfrlhfTrainer,
    disable_dropout,
    ensure_pad_token,
    prepare_dataset,
    prepare_eval_datasets,
)
from hfrlhf.trainers.reference import is_peft_model

__all__ = ["PPOConfig", "PPOTrainer"]

PPO_STATE_NAME = "ppo_state.json"
SAMPLES_NAME = "samples.jsonl"


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class PPOConfig(HfrlhfConfig):
    """Configuration of :class:`PPOTrainer`; names follow TRL's PPOConfig where TRL has them.

    ``per_device_train_batch_size`` prompts per device make one rollout of ``B = prompts * num_generations``
    responses; it is cut into ``num_mini_batches`` mini-batches (one optimizer step each), and each mini-batch
    into ``gradient_accumulation_steps`` micro-batches. A Trainer step (``max_steps``, ``save_steps``, the
    learning-rate schedule) is one rollout.
    """

    learning_rate: float = field(default=3e-6, metadata=_help("AdamW learning rate (TRL's PPO default)."))
    # 1. generation
    response_length: int = field(default=53, metadata=_help("Maximum new tokens per response."))
    max_new_tokens: int | None = field(default=None, metadata=_help("Alias of response_length; wins when set."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature; log-probs use the same one."))
    top_k: int | None = field(default=None, metadata=_help("Sample from the k most likely tokens (None: all)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0: off)."))
    stop_token: str | None = field(default="eos", metadata=_help(
        "'eos': responses end at the tokenizer's EOS token (None is accepted and means the same: an EOS "
        "always ends a response)."))
    stop_token_id: int | None = field(default=None, metadata=_help("Another token id that ends a response."))
    missing_eos_penalty: float | None = field(default=None, metadata=_help(
        "Subtracted from the score of a response cut at response_length without a stop token."))
    num_generations: int = field(default=1, metadata=_help("Responses sampled per prompt (>= 2 for rloo, grpo)."))
    # 2.-4. rewards
    normalize_rewards: bool = field(default=False, metadata=_help("Normalise scores with running mean/std."))
    reward_clip: float | None = field(default=None, metadata=_help("Clamp (normalised) scores to [-c, c]."))
    kl_coef: float = field(default=0.05, metadata=_help("beta: weight of the per-token KL penalty (initial value "
                                                        "when adaptive_kl)."))
    kl_estimator: str = field(default="k1", metadata=_help("Per-token KL estimator.", choices=["k1", "k2", "k3"]))
    adaptive_kl: bool = field(default=False, metadata=_help("Adapt beta towards kl_target (Ziegler et al.)."))
    kl_target: float = field(default=6.0, metadata=_help("Target KL per response (nats) of the adaptive controller."))
    kl_horizon: float = field(default=10000.0, metadata=_help("Adaptive controller horizon, in responses."))
    # 5. advantages
    advantage_estimator: str = field(default="gae", metadata=_help(
        "gae (with a critic), or critic-free rloo, grpo, reinforce_pp.", choices=sorted(ADVANTAGE_ESTIMATORS)))
    gamma: float = field(default=1.0, metadata=_help("Discount factor."))
    lam: float = field(default=0.95, metadata=_help("GAE lambda."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten per-token rewards (mean kept) before GAE."))
    whiten_advantages: bool = field(default=True, metadata=_help("Whiten GAE and RLOO advantages over the batch."))
    # 6. updates
    num_ppo_epochs: int = field(default=4, metadata=_help("Passes over each rollout."))
    num_mini_batches: int = field(default=1, metadata=_help("Mini-batches (optimizer steps) per pass."))
    cliprange: float = field(default=0.2, metadata=_help("Policy ratio clip epsilon."))
    cliprange_value: float | None = field(default=0.2, metadata=_help("Value clip around rollout values (None: off)."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    entropy_coef: float = field(default=0.0, metadata=_help("Weight of the entropy bonus."))
    ptx_coef: float = field(default=0.0, metadata=_help("Weight of the pretraining (SFT) loss on ptx_dataset."))
    # critic
    critic_init: str = field(default="auto", metadata=_help(
        "Separate critic's start: 'reward' (copy of the reward model, head included), 'policy' (copy of the "
        "policy, new head) or 'auto' (reward when possible). With LoRA the critic shares the policy's base.",
        choices=["auto", "reward", "policy"]))
    value_head_init_std: float = field(default=0.0, metadata=_help("Std of a new value head's weights (0: zeros)."))
    policy_adapter_name: str = field(default="policy", metadata=_help("LoRA adapter of the policy."))
    critic_adapter_name: str = field(default="critic", metadata=_help("LoRA adapter of the critic."))
    # logging
    num_sample_generations: int = field(default=10, metadata=_help(
        "How many times over training to write sample prompt/completion/score rows to samples.jsonl (0: never)."))

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            self.response_length = self.max_new_tokens
        if self.response_length < 1:
            raise ValueError(f"response_length must be >= 1, got {self.response_length}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        choices = {"advantage_estimator": tuple(ADVANTAGE_ESTIMATORS), "kl_estimator": ("k1", "k2", "k3"),
                   "stop_token": ("eos", None), "critic_init": ("auto", "reward", "policy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.advantage_estimator in ("rloo", "grpo") and self.num_generations < 2:
            raise ValueError(f"{self.advantage_estimator} compares samples of one prompt: set num_generations >= 2")
        if min(self.num_generations, self.num_ppo_epochs, self.num_mini_batches) < 1:
            raise ValueError("num_generations, num_ppo_epochs and num_mini_batches must be >= 1")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise ValueError("adaptive_kl needs kl_target > 0 and kl_horizon > 0")
        if min(self.cliprange, self.vf_coef, self.entropy_coef, self.ptx_coef, self.kl_coef) < 0:
            raise ValueError("cliprange, vf_coef, entropy_coef, ptx_coef and kl_coef must be >= 0")
        rollout = self.per_device_train_batch_size * self.num_generations
        if rollout % self.num_mini_batches:
            raise ValueError(f"the rollout of {rollout} responses (per_device_train_batch_size x num_generations) "
                             f"does not split into num_mini_batches={self.num_mini_batches} equal mini-batches")
        if (rollout // self.num_mini_batches) % self.gradient_accumulation_steps:
            raise ValueError(f"a mini-batch of {rollout // self.num_mini_batches} responses does not split into "
                             f"gradient_accumulation_steps={self.gradient_accumulation_steps} equal micro-batches")
        if self.max_prompt_length is None and self.max_length is not None:
            if self.max_length <= self.response_length:
                raise ValueError(f"max_length ({self.max_length}) leaves no room for prompts after "
                                 f"response_length ({self.response_length})")
            self.max_prompt_length = self.max_length - self.response_length
        super().__post_init__()

    @property
    def micro_batch_size(self) -> int:
        """Responses per forward/backward of the update."""
        rollout = self.per_device_train_batch_size * self.num_generations
        return rollout // self.num_mini_batches // self.gradient_accumulation_steps


def _prompt_dataset(data: Any, tokenizer: PreTrainedTokenizerBase, args: PPOConfig, name: str) -> Dataset | None:
    """Tokenized prompt records that keep their raw ``prompt`` next to ``prompt_ids``."""
    if data is None:
        return None
    if isinstance(data, Dataset) and "prompt_ids" in data.column_names:
        check_tokenized(data, len(tokenizer), source=name)  # a bad id is named here, not inside generate
        return data
    records = load(data, drop_invalid=args.drop_invalid_rows, kind="prompt")
    tokenized = prepare_dataset(records, tokenizer, args, kinds=("prompt",), name=name)
    if len(tokenized) != len(records):
        raise ValueError(f"{name}: {len(records) - len(tokenized)} prompts were dropped while tokenizing; "
                         "set max_prompt_length so every prompt fits")
    return tokenized.add_column("prompt", records["prompt"], feature=records.features["prompt"])


class PPOTrainer(HfrlhfTrainer):
    """Optimise a policy with PPO (or RLOO / GRPO / REINFORCE++ advantages) on prompts.

    Args (TRL's order): ``args`` (:class:`PPOConfig`), ``processing_class`` (the policy's tokenizer), ``model``
    (a causal LM, or a name), ``ref_model`` (default: the policy with adapters off under LoRA, a frozen copy
    otherwise), ``reward_model`` (a sequence classifier, a name, or a callable ``(prompts, completions) ->
    scores``), ``train_dataset`` (prompt records), ``value_model`` (an explicit critic: a sequence classifier),
    ``peft_config`` (LoRA: one base model for policy, reference and critic); keyword-only
    ``reward_processing_class`` (the reward model's tokenizer when it differs: completions are decoded and
    re-tokenized) and ``ptx_dataset`` (SFT or language-modeling ``text`` records mixed in with ``ptx_coef``).
    """

    _tag_names = ["hfrlhf", "ppo"]

    def __init__(self, args: PPOConfig | None = None, processing_class: PreTrainedTokenizerBase | None = None,
                 model: nn.Module | str | None = None, ref_model: nn.Module | str | None = None,
                 reward_model: Any = None, train_dataset: Any = None, value_model: nn.Module | None = None,
                 data_collator: Any = None, eval_dataset: Any = None, optimizers: tuple = (None, None),
                 callbacks: list | None = None, peft_config: Any = None, *,
                 reward_processing_class: PreTrainedTokenizerBase | None = None, ptx_dataset: Any = None,
                 **kwargs: Any) -> None:
        args = args or PPOConfig(output_dir="ppo-output")
        set_seed(args.seed)
        if model is None or reward_model is None:
            raise ValueError("PPOTrainer needs a model (the policy) and a reward_model (model or callable)")
        if isinstance(model, str):
            processing_class = processing_class or load_tokenizer(model)
            model = load_causal_lm(model)
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required when model is not given by name")
        ensure_pad_token(processing_class, model)
        ref_model = load_causal_lm(ref_model) if isinstance(ref_model, str) else ref_model
        reward_model = load_reward_model(reward_model) if isinstance(reward_model, str) else reward_model
        scorer = RewardScorer(reward_model, processing_class, reward_processing_class)
        needs_critic = args.advantage_estimator == "gae"

        # the policy; with LoRA one base model serves policy (adapter), reference (adapters off), critic (adapter)
        shared = peft_config is not None or is_peft_model(model)
        critic_adapter = args.critic_adapter_name if shared and needs_critic and value_model is None else None
        if shared:
            model, _ = attach_shared_lora(model, peft_config, policy_adapter=args.policy_adapter_name,
                                          critic_adapter=critic_adapter, gradient_checkpointing=args.gradient_checkpointing)
        critic = head = None
        if needs_critic:  # DeepSpeed-Chat / ColossalChat: from the reward model when it reads the policy's tokens
            critic, head = build_critic(model, value_model=value_model, critic_init=args.critic_init,
                                        reward_model=None if scorer.retokenize else scorer.model,
                                        critic_adapter=critic_adapter, init_std=args.value_head_init_std, seed=args.seed)
        for trained in (model, critic):
            if trained is not None:
                keep_4bit_weights_trainable(trained)
                if args.disable_dropout:
                    disable_dropout(trained)
        if ref_model is None and not shared:
            ref_model = copy.deepcopy(model)  # full fine-tuning: the reference is the policy as it starts
        for frozen in (ref_model, scorer.model):
            if frozen is not None:
                frozen.eval().requires_grad_(False)
                disable_dropout(frozen)

        actor_critic = ActorCritic(model, critic=critic, value_head=head, critic_adapter=critic_adapter,
                                   temperature=args.temperature, chunk_size=args.logprob_chunk_size)
        train_dataset = _prompt_dataset(train_dataset, processing_class, args, "train_dataset")
        eval_dataset = prepare_eval_datasets(  # one dataset, or a dict of named ones
            eval_dataset, lambda data, name: _prompt_dataset(data, processing_class, args, name))
        super().__init__(model=actor_critic, args=args, data_collator=data_collator or RolloutCollator(processing_class),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers, **kwargs)
        prepare = self.accelerator.prepare_model
        self.ref_model = prepare(ref_model, evaluation_mode=True) if ref_model is not None else None
        if scorer.model is not None:
            scorer.model = prepare(scorer.model, evaluation_mode=True)
        self.scorer = scorer
        self.ptx_dataset = None
        if ptx_dataset is not None and args.ptx_coef > 0:
            self.ptx_dataset = prepare_dataset(ptx_dataset, processing_class, args, kinds=("sft", "text"),
                                               name="ptx_dataset")
        self.ptx_collator = SFTCollator(processing_class.pad_token_id)
        self.kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl
                       else FixedKLController(args.kl_coef))
        self.running = RunningMoments(all_reduce=self._all_reduce) if args.normalize_rewards else None
        self.pad_id = processing_class.pad_token_id
        self.stop_ids = sorted({i for i in (processing_class.eos_token_id, args.stop_token_id) if i is not None})
        self.generation_config = make_generation_config(
            max_new_tokens=args.response_length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            stop_token_ids=self.stop_ids, pad_token_id=self.pad_id)

    @property
    def _all_reduce(self):
        """Sum over processes for global-batch statistics, or None in a single process."""
        return (lambda t: self.accelerator.reduce(t, "sum")) if self.accelerator.num_processes > 1 else None

    # --- stages 1-2: sample and score ------------------------------------------------------------------------------
    def _sample(self, ac: ActorCritic, prompts: list[Any], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Stages 1-2: generate, cut after the first stop token, score at the last real token.
        Returns ``(responses, completions, batch, raw scores)``."""
        policy = unwrap(ac.policy)
        with self._generation_progress(policy, prompt_ids.shape[0]):
            ids = generate(policy, prompt_ids, prompt_mask, self.generation_config)
        responses = truncate_at_stop(ids, self.stop_ids, self.pad_id)
        completions = self.processing_class.batch_decode(
            [ids[:n] for ids, n in zip(responses.ids.tolist(), responses.lengths.tolist())], skip_special_tokens=True)
        batch = sequence_batch(prompt_ids, prompt_mask, responses, self.pad_id)
        return responses, completions, batch, self.scorer(prompts, completions, batch, responses.ended)

    @contextmanager
    def _generation_progress(self, policy: nn.Module, rows: int) -> Iterator[None]:
        """A progress bar over one rollout's generation, one tick per decoding step (a forward of the input
        embeddings), up to ``response_length``; the Trainer's own bar moves once per rollout. Only on the main
        process, and not with ``disable_tqdm``."""
        if self.args.disable_tqdm or not self.is_world_process_zero():
            yield
            return
        bar = tqdm(total=self.args.response_length, desc=f"rollout: generating {rows} responses", unit="tok",
                   leave=False, dynamic_ncols=True)

        def tick(*_: Any) -> None:
            if bar.n < bar.total:
                bar.update(1)

        hook = policy.get_input_embeddings().register_forward_hook(tick)
        try:
            yield
        finally:
            hook.remove()
            bar.close()

    # --- one PPO iteration -----------------------------------------------------------------------------------------
    def _ppo_step(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[float, float | None]:
        args, ac = self.args, self.accelerator.unwrap_model(model)
        k, beta = args.num_generations, self.kl_ctl.value
        inputs = self._prepare_inputs(inputs)
        prompt_ids = inputs["input_ids"].repeat_interleave(k, 0)  # prompt-major groups of k samples
        prompt_mask = inputs["attention_mask"].repeat_interleave(k, 0)
        prompts = [p for p in inputs["prompts"] for _ in range(k)]
        with torch.no_grad(), self.accelerator.autocast():
            # 1.-2. generate, cut at the first stop token, score at the last real token
            responses, completions, batch, raw_scores = self._sample(ac, prompts, prompt_ids, prompt_mask)
            mask, width, lengths = responses.mask, responses.ids.shape[1], responses.lengths
            # 3. old log-probs and values (one policy/critic forward), reference log-probs
            out = ac(batch)
            logps = to_grid(out.logps, batch, lengths, width)
            values = to_grid(out.values, batch, lengths, width) if out.values is not None else None
            ref = to_grid(reference_logps(ac.policy, batch, self.ref_model, temperature=args.temperature,
                                          chunk_size=args.logprob_chunk_size), batch, lengths, width)
            # 4. rewards: shaped scores at the last token, minus beta * KL on every token
            scores = shape_scores(raw_scores, responses.ended, missing_eos_penalty=args.missing_eos_penalty,
                                  running=self.running, clip=args.reward_clip)
            kl = token_kl(logps, ref, mask, args.kl_estimator)
            # 5. advantages
            advantages, returns = compute_advantages(
                args.advantage_estimator, scores, kl, mask, values=values, beta=beta, gamma=args.gamma, lam=args.lam,
                k=k, whiten_rewards=args.whiten_rewards, whiten_advantages=args.whiten_advantages,
                all_reduce=self._all_reduce)
        rollout = Rollout(prompt_ids, prompt_mask, responses, logps, values, advantages, returns)
        # 6. num_ppo_epochs passes of clipped updates over mini-batches
        loss, grad_norm, update_metrics = self._update(model, rollout)
        # 7. KL control, from this rollout's mean KL per response
        seq_kl = kl.sum(1)
        mean_kl = self.accelerator.reduce(seq_kl.mean(), "mean")
        self.kl_ctl.update(mean_kl, n_steps=seq_kl.shape[0] * self.accelerator.num_processes)

        self.store_metrics({
            **update_metrics,
            "objective/scores": raw_scores.mean(), "objective/kl": seq_kl.mean(),
            "objective/entropy": torch.where(mask, -logps, 0.0).sum(1).mean(),
            "objective/non_score_reward": -beta * seq_kl.mean(), "objective/rlhf_reward": scores.mean() - beta * seq_kl.mean(),
            "lengths/mean": lengths.float().mean(), "eos_rate": responses.ended.float().mean(), "beta": beta,
            "episode": float((self.state.global_step + 1) * seq_kl.shape[0] * self.accelerator.num_processes),
        })
        self._write_samples(prompts, completions, raw_scores)
        return loss, grad_norm

    def _update(self, model: nn.Module, rollout: Rollout) -> tuple[float, float | None, dict[str, float]]:
        args, ga = self.args, self.args.gradient_accumulation_steps
        size, micro = rollout.responses.ids.shape[0], args.micro_batch_size
        stats: dict[str, list[float]] = defaultdict(list)
        grad_norm = None
        for epoch in range(args.num_ppo_epochs):
            for j, idx in enumerate(torch.randperm(size, device=rollout.logps.device).split(micro)):
                sync = (j + 1) % ga == 0  # the last micro-batch of a mini-batch steps the optimizer
                self.accelerator.gradient_state._set_sync_gradients(sync)
                sub = rollout.select(idx)
                batch = sequence_batch(sub.prompt_ids, sub.prompt_mask, sub.responses, self.pad_id)
                ptx = self._ptx_batch((self.state.global_step * args.num_ppo_epochs + epoch) * (size // micro) + j)
                with nullcontext() if sync else self.accelerator.no_sync(model):
                    with self.accelerator.autocast():
                        out = model(batch, ptx, entropy_grad=args.entropy_coef > 0)
                    loss, metrics = update_loss(out, batch, sub, cliprange=args.cliprange, vf_coef=args.vf_coef,
                                                cliprange_value=args.cliprange_value, entropy_coef=args.entropy_coef,
                                                ptx_coef=args.ptx_coef)
                    loss = self.guard_loss(loss, model)
                    self.accelerator.backward(loss / ga)
                if sync:
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                    self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                    self.optimizer.step()
                    self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                    self.optimizer.zero_grad()
                for name, value in {**metrics, "loss/total": loss.detach()}.items():
                    stats[name].append(float(value))
        renames = {"loss/policy": "loss/policy_avg", "loss/value": "loss/value_avg"}
        averaged = {renames.get(n, n): sum(v) / len(v) for n, v in stats.items()}
        return averaged["loss/total"], grad_norm, averaged

    def _ptx_batch(self, index: int) -> dict[str, torch.Tensor] | None:
        """PTX micro-batch number ``index``: a seeded permutation per pass over the data, so resuming continues it."""
        if self.ptx_dataset is None:
            return None
        n, size, rows = len(self.ptx_dataset), self.args.micro_batch_size, []
        for i in range(index * size, (index + 1) * size):
            passes, pos = divmod(i, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + passes))
            rows.append(self.ptx_dataset[int(order[pos])])
        return self._prepare_inputs(self.ptx_collator(rows))

    def _write_samples(self, prompts: list[Any], completions: list[str], scores: torch.Tensor) -> None:
        n = self.args.num_sample_generations
        if n <= 0 or not self.is_world_process_zero() or self.state.global_step % max(1, self.state.max_steps // n):
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, SAMPLES_NAME), "a") as f:
            for p, c, s in list(zip(prompts, completions, scores.tolist()))[:8]:
                f.write(json.dumps({"step": self.state.global_step, "prompt": p, "completion": c, "score": s}) + "\n")

    # --- the Trainer's loop, with one rollout per step -------------------------------------------------------------
    def set_initial_training_values(self, args: PPOConfig, dataloader):  # type: ignore[override]
        """One step = one rollout of a prompt batch, so an epoch has ``len(dataloader)`` steps."""
        total = self._train_batch_size * args.world_size
        if has_length(dataloader):
            per_epoch = len(dataloader)
            max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
            epochs, examples = math.ceil(max_steps / per_epoch), self.num_examples(dataloader)
        elif args.max_steps > 0:
            per_epoch = max_steps = args.max_steps
            epochs, examples = sys.maxsize, total * max_steps
        else:
            raise ValueError("max_steps must be set for a train_dataset without a length")
        return epochs, per_epoch, examples, max_steps * total, total, per_epoch, max_steps

    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial,
                   ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained,
                   steps_trained_in_current_epoch):
        resuming = resume_from_checkpoint is not None and epoch == epochs_trained
        skip = self.state.global_step - epoch * steps_in_epoch if resuming and not self.args.ignore_data_skip else 0
        if hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)
        iterator = iter(skip_first_batches(train_dataloader, skip) if skip > 0 else train_dataloader)
        if resuming:  # after the skip: data loading never moves the stream rollouts sample from
            self._load_rng_state(resume_from_checkpoint)
        grad_norm, lr = None, None
        for step in range(max(skip, 0), steps_in_epoch):
            with torch.random.fork_rng(devices=[]):
                inputs = next(iterator, None)
            if inputs is None:
                break
            self.model.train()
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            with shared_weight_casts():  # one low-precision copy of each frozen weight per iteration
                loss, grad_norm = self._ppo_step(model, inputs)
            self._tr_loss += loss
            lr = self._get_learning_rate()
            self.lr_scheduler.step()
            self.state.global_step += 1
            self.state.epoch = epoch + (step + 1) / steps_in_epoch
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            self._maybe_log_save_evaluate(self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                          start_time, learning_rate=lr)
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
        self._maybe_log_save_evaluate(self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                      start_time, learning_rate=lr)

    # --- evaluation: sample on eval prompts with a fixed seed, report the scores ------------------------------------
    def prepare_eval_dataset(self, data: Any, name: str = "eval_dataset") -> Dataset:
        """Prompts given to ``evaluate()`` are loaded and tokenized like ``eval_dataset``."""
        return _prompt_dataset(data, self.processing_class, self.args, name)

    def _evaluate_one(self, eval_dataset: Any, ignore_keys: list[str] | None, metric_key_prefix: str) -> dict[str, float]:
        """Mean score, length and EOS rate of one sampled response per eval prompt (``evaluate()`` prepares the
        prompts and calls this once per dataset).

        Sampling restarts from ``args.seed`` on every call (the training random stream is left untouched), so
        two evaluations differ only through the policy: a low-variance before/after comparison.
        """
        dataloader = self.get_eval_dataloader(eval_dataset)
        ac, was_training = self.accelerator.unwrap_model(self.model), self.model.training
        self.model.eval()
        parts: list[torch.Tensor] = []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.accelerator.autocast():
            torch.manual_seed(self.args.seed)
            for inputs in dataloader:
                inputs = self._prepare_inputs(inputs)
                responses, _, _, scores = self._sample(ac, inputs["prompts"], inputs["input_ids"], inputs["attention_mask"])
                row = torch.stack([scores, responses.lengths.float(), responses.ended.float()], 1)
                parts.append(self.accelerator.gather_for_metrics(row))
        table = torch.cat(parts).mean(0).tolist()
        metrics = {f"{metric_key_prefix}_{name}": value
                   for name, value in zip(("objective/scores", "lengths/mean", "eos_rate"), table)}
        self.log(metrics)
        self.model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- checkpoints: policy at the root, critic in critic/, controller and reward statistics in ppo_state.json --
    def _ppo_state(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "running": self.running.state_dict() if self.running else None}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save(output_dir)
        self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        with open(os.path.join(output_dir, PPO_STATE_NAME), "w") as f:
            json.dump(self._ppo_state(), f)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.accelerator.unwrap_model(model or self.model).load(resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, PPO_STATE_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            if self.running is not None and state.get("running"):
                self.running.load_state_dict(state["running"])

