"""Train to a KL budget: stop once the policy has moved a given number of nats away from its reference.

How far a policy drifts from its reference in a fixed number of steps depends on the data, the seed and the
method, so a step count chosen on one run can land well under or over a KL budget on the next.
:class:`KLBudgetCallback` measures the drift while training: every ``every_n_steps`` optimizer steps it samples
completions of a fixed set of prompts from the policy and estimates

    KL(policy || reference) = E_{y ~ policy} [ log policy(y | x) - log reference(y | x) ]

on them (summed over the completion's tokens, both log-probs at the sampling temperature), logs it as
``kl_budget/kl``, and stops training once it reaches ``max_kl``, by default putting back the weights of the last
estimate under the budget. The reference is the policy with its LoRA
adapter disabled, or an explicit ``ref_model``. Use prompts the evaluation will not see.

With ``interpolate_past`` it trains *past* the budget instead, until an estimate reaches that multiple of it,
and then moves the weights back along the straight line to the reference, ``W_ref + lam * (W - W_ref)``, to the
largest ``lam`` whose estimate is under the budget (a few estimates, see :meth:`KLBudgetCallback.interpolate`).
This is the LITI step of WARP (Rame et al., 2024), who found it keeps more reward per nat than stopping training
earlier; on the sentiment experiment here the gain was 0.01-0.02 at equal KL (docs/trainers.md). For a LoRA adapter
the line is exact: ``lam`` scales ``s * B A``.

It works with every trainer here (DPO, KTO, SFT, PPO: for PPO the policy inside the trainer's actor-critic
module). Every process estimates on the same prompts with the same seed, so all of them stop at the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hfrlhf.data.collators import PromptCollator
from hfrlhf.models.value import unwrap
from hfrlhf.ops.casts import shared_weight_casts
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.ops.rollout import (
    generate,
    generate_with_logprobs,
    make_generation_config,
    reference_logps,
    sequence_batch,
    truncate_at_stop,
)

__all__ = ["KLBudgetCallback", "sample_kl"]

logger = logging.getLogger(__name__)


def _prompt_ids(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt, tokenized as the trainers tokenize prompt-only data (chat messages through the
    chat template with the generation prompt, or raw text)."""
    from datasets import Dataset

    from hfrlhf.data.tokenize import tokenize_dataset

    rows = Dataset.from_list([{"prompt": p} for p in prompts])
    return list(tokenize_dataset(rows, tokenizer, kind="prompt", source="KLBudgetCallback prompts")["prompt_ids"])


@torch.no_grad()
def sample_kl(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    ref_model: nn.Module | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    bf16: bool = False,
    rescore_policy: bool = False,
) -> torch.Tensor:
    """``(len(prompts),)`` per-sample estimates of KL(policy || reference), one completion per prompt.

    ``prompts`` are chat message lists or raw text, tokenized as prompt-only training data is.
    Each completion is sampled from ``model`` at ``temperature`` and stops at the tokenizer's EOS token; its
    estimate is ``sum_t log p(y_t) - log q(y_t)`` over its tokens, both at ``temperature``, ``q`` being
    ``ref_model`` or ``model`` with its adapters disabled. The mean is an unbiased estimate of the KL. The random
    stream restarts from ``seed`` and is restored afterwards; ``bf16`` samples under bf16 autocast.

    ``log q`` comes from one teacher-forced pass. ``log p`` is read from the logits the sampling computed anyway
    (:func:`hfrlhf.ops.rollout.generate_with_logprobs`), which saves a forward pass of the policy, about a quarter
    of the estimate's time; those logits come from the cached decode, which multiplies in another order than a
    full pass, so a policy equal to its reference gives float-rounding noise instead of 0 (under 1e-3 nats per
    completion of 40 tokens on the bundled model in float32). ``rescore_policy=True`` takes ``log p`` from a
    teacher-forced pass like ``log q``: exactly 0 for the reference itself, at the cost of that pass.
    """
    return _sample_kl(model, tokenizer, _prompt_ids(tokenizer, prompts), ref_model=ref_model,
                      max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed, bf16=bf16,
                      rescore_policy=rescore_policy)


@torch.no_grad()
def _sample_kl(model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, ref_model: nn.Module | None,
               max_new_tokens: int, temperature: float, batch_size: int, seed: int, bf16: bool,
               rescore_policy: bool = False) -> torch.Tensor:
    """:func:`sample_kl` on prompts already tokenized."""
    policy = unwrap(model)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    stops = [tokenizer.eos_token_id]
    config = make_generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=None, top_p=1.0,
                                    stop_token_ids=stops, pad_token_id=tokenizer.pad_token_id)
    collate = PromptCollator(tokenizer.pad_token_id)
    out = []
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
            stack.enter_context(shared_weight_casts())
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext())
            for start in range(0, len(prompt_ids), batch_size):
                prompt_batch = collate([{"prompt_ids": p} for p in prompt_ids[start:start + batch_size]])
                ids, mask = prompt_batch["input_ids"].to(device), prompt_batch["attention_mask"].to(device)
                if rescore_policy:
                    generated, step_logps = generate(policy, ids, mask, config), None
                else:
                    generated, step_logps = generate_with_logprobs(policy, ids, mask, config, temperature)
                responses = truncate_at_stop(generated, stops, tokenizer.pad_token_id)
                batch = sequence_batch(ids, mask, responses, tokenizer.pad_token_id)
                if step_logps is None:  # teacher-forced like the reference's: a policy equal to it gives exactly 0
                    policy_logps = batch_logprobs(policy, batch, temperature=temperature).token_logps
                else:
                    policy_logps = step_logps[responses.mask]  # row-major: the order of the batch's scored tokens
                token_kl = policy_logps - reference_logps(policy, batch, ref_model, temperature=temperature)  # (N,)
                seq_kl = torch.zeros(len(prompt_batch["input_ids"]), dtype=torch.float64, device=device)
                out.append(seq_kl.index_add_(0, batch["target_seq"], token_kl.double()))
    finally:
        policy.train(was_training)
    return torch.cat(out).float()


class KLBudgetCallback(TrainerCallback):
    """Stop training when the policy's KL from its reference, estimated on samples, reaches ``max_kl`` nats.

    Args:
        prompts: prompts to sample on, as in prompt-only data (chat message lists, or raw text); not the
            evaluation's.
        tokenizer: the policy's tokenizer (default: the trainer's ``processing_class``).
        max_kl: the budget, in nats per completion (summed over its tokens).
        every_n_steps: optimizer steps between two estimates.
        first_step: the first step estimated (before it the policy is assumed inside the budget).
        near_budget: once an estimate reaches this fraction of ``max_kl``, estimate after every step: the KL
            can climb several nats between two estimates near the end, and a rollback then loses every step
            since the last one. None: every ``every_n_steps`` throughout.
        ref_model: an explicit reference (default: the policy with its adapters disabled).
        rollback: when an estimate reaches the budget, put back the trainable weights of the last estimate under it
            (kept in memory at each estimate; LoRA adapters are small), so the trained model is the last one known
            to be inside the budget. Without it the model stays as it was at the estimate over the budget.
        interpolate_past: train on until an estimate reaches ``interpolate_past * max_kl`` (at least 1), then
            interpolate the weights back toward the reference until the estimate is under ``max_kl``; the same
            when training ends between the two. None: stop at ``max_kl`` (and roll back).
        interpolate_tries: estimates the interpolation may spend; it stops early once an estimate lands in
            ``[interpolate_low * max_kl, max_kl)``.
        max_new_tokens, temperature, batch_size, seed: sampling settings; use the evaluation's.
        rescore_policy: take the policy's log-probs from a second, teacher-forced pass instead of the sampling's
            logits (see :func:`sample_kl`: exact 0 for the reference itself, one more forward pass per estimate).

    The last step of training (``max_steps``) is always estimated, so a run that ends without reaching the budget
    ends with weights known to be inside it. ``estimates`` keeps ``(step, kl)`` of every estimate; ``stopped_at``
    the step training stopped at, if it did; ``kept_step`` the step whose weights the model ends with after a
    rollback (0: the weights before training). After an interpolation ``interpolation`` keeps ``(lam, kl)`` of each
    of its estimates and ``kept_lambda`` the ``lam`` the model ends with (None: no ``lam`` came out under the
    budget, and the rollback's weights are kept instead).

    >>> cb = KLBudgetCallback(["Say hi."], max_kl=8.0, every_n_steps=2, first_step=10)
    >>> [step for step in range(1, 15) if cb.due(step)]
    [10, 12, 14]
    >>> cb.estimates.append((12, 6.0))  # past near_budget * max_kl = 5.6: every step from here
    >>> [step for step in range(1, 17) if cb.due(step, max_steps=16)]
    [10, 12, 13, 14, 15, 16]
    """

    def __init__(
        self,
        prompts: Sequence[Any],
        tokenizer: Any = None,
        *,
        max_kl: float,
        every_n_steps: int = 1,
        first_step: int = 1,
        near_budget: float | None = 0.7,
        ref_model: nn.Module | None = None,
        rollback: bool = True,
        interpolate_past: float | None = None,
        interpolate_tries: int = 3,
        interpolate_low: float = 0.85,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        batch_size: int = 16,
        seed: int = 0,
        rescore_policy: bool = False,
    ) -> None:
        if not prompts:
            raise ValueError("KLBudgetCallback needs at least one prompt")
        if max_kl <= 0 or every_n_steps < 1 or first_step < 1:
            raise ValueError(f"need max_kl > 0, every_n_steps >= 1 and first_step >= 1, got {max_kl}, "
                             f"{every_n_steps} and {first_step}")
        if near_budget is not None and not 0 < near_budget <= 1:
            raise ValueError(f"near_budget is a fraction of max_kl in (0, 1], or None; got {near_budget}")
        if interpolate_past is not None and (interpolate_past < 1 or interpolate_tries < 1 or not 0 < interpolate_low < 1):
            raise ValueError(f"need interpolate_past >= 1, interpolate_tries >= 1 and interpolate_low in (0, 1), got "
                             f"{interpolate_past}, {interpolate_tries} and {interpolate_low}")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.max_kl = float(max_kl)
        self.every_n_steps = every_n_steps
        self.first_step = first_step
        self.near_budget = near_budget
        self.ref_model = ref_model
        self.rollback = rollback or interpolate_past is not None  # the interpolation starts from the first weights
        self.interpolate_past = interpolate_past
        self.interpolate_tries = interpolate_tries
        self.interpolate_low = interpolate_low
        self.interpolation: list[tuple[float, float]] = []
        self.kept_lambda: float | None = None
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed,
                             rescore_policy=rescore_policy)
        self.estimates: list[tuple[int, float]] = []
        self.stopped_at: int | None = None
        self.kept_step: int | None = None
        self._kept: dict[str, torch.Tensor] | None = None  # trainable weights at the last estimate under the budget
        self._kept_at = 0
        self._start: dict[str, torch.Tensor] | None = None  # trainable weights before training (interpolation)
        self._prompt_ids: list[list[int]] | None = None  # tokenized at the first estimate

    def due(self, step: int, max_steps: int | None = None) -> bool:
        """Whether the KL is estimated after optimizer step ``step`` (of ``max_steps``), given the estimates so far."""
        if step < self.first_step:
            return False
        if step == max_steps or (step - self.first_step) % self.every_n_steps == 0:
            return True
        last = self.estimates[-1] if self.estimates else None
        return (self.near_budget is not None and last is not None and step > last[0]
                and last[1] >= self.near_budget * self.stop_kl)

    @property
    def stop_kl(self) -> float:
        """The estimate that stops training: ``max_kl``, or ``interpolate_past * max_kl`` when interpolating."""
        return self.max_kl * (self.interpolate_past or 1.0)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> Any:
        if self.rollback and model is not None:  # the weights before training are inside any budget
            self._keep(model, state.global_step)
            self._start = self._kept
        return control

    def _keep(self, model: nn.Module, step: int) -> None:
        self._kept = {k: v.detach().clone() for k, v in unwrap(model).named_parameters() if v.requires_grad}
        self._kept_at = step

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    processing_class: Any = None, **kwargs: Any) -> Any:
        if model is None or not self.due(state.global_step, state.max_steps):
            return control
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("KLBudgetCallback needs a tokenizer: pass tokenizer= or give the trainer processing_class")
        policy = getattr(unwrap(model), "policy", model)  # PPO's actor-critic module holds the policy
        if self._prompt_ids is None:
            self._prompt_ids = _prompt_ids(tokenizer, self.prompts)

        def estimate() -> float:
            return float(_sample_kl(policy, tokenizer, self._prompt_ids, ref_model=self.ref_model,
                                    bf16=bool(args.bf16), **self.sampling).mean())

        kl = estimate()
        self.estimates.append((state.global_step, kl))
        state.log_history.append({"kl_budget/kl": kl, "step": state.global_step})
        logger.info("step %d: KL from the reference %.2f nats (budget %.2f)", state.global_step, kl, self.max_kl)
        if kl < self.max_kl:
            if self.rollback:
                self._keep(model, state.global_step)
            return control
        if kl < self.stop_kl and state.global_step != state.max_steps:  # interpolating: train on past the budget
            return control
        self.stopped_at = state.global_step
        control.should_training_stop = True
        if self.interpolate_past is not None and self._start is not None:
            self.interpolate(model, kl, estimate)
            if self.kept_lambda is not None:
                state.log_history.append({"kl_budget/kept_lambda": self.kept_lambda, "step": state.global_step})
                return control
        if self.rollback and self._kept is not None:
            self._set_weights(model, self._kept)
            self.kept_step = self._kept_at
            state.log_history.append({"kl_budget/kept_step": self._kept_at, "step": state.global_step})
            logger.info("KL budget reached: weights of step %d put back", self._kept_at)
        return control

    @staticmethod
    def _set_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in unwrap(model).named_parameters():
                if k in weights:
                    v.copy_(weights[k])

    def interpolate(self, model: nn.Module, kl: float, estimate: Any) -> None:
        """Move the trained weights (estimated at ``kl`` nats, at or past the budget) back toward the reference to
        the largest ``lam`` found under the budget, spending at most ``interpolate_tries`` calls of ``estimate``.

        Each try models the KL as ``c * lam ** p`` through the two tried points that bracket the target (the middle
        of ``[interpolate_low * max_kl, max_kl)``; ``p = 2`` with one point, the KL of a small step being quadratic
        in it) and tries the ``lam`` that model puts at the target. The interpolated weights are kept when their
        estimate is under the budget and either in that range or at least the rollback's kept estimate; otherwise the
        rollback applies.
        """
        trained = {k: v.detach().clone() for k, v in unwrap(model).named_parameters() if v.requires_grad}
        lora_a, lora_b = _lora_factors(unwrap(model))
        start = self._start or {}

        def weights_at(lam: float) -> dict[str, torch.Tensor]:
            out = {}
            for k, v in trained.items():
                if k in lora_a:  # the adapter's update s * B A is linear in B alone
                    out[k] = v
                elif k in lora_b:
                    out[k] = v * lam
                else:
                    out[k] = start[k] + lam * (v - start[k]) if k in start else v
            return out

        target = (1 + self.interpolate_low) / 2 * self.max_kl
        points = [(0.0, 0.0), (1.0, kl)]
        best: tuple[float, float] | None = None
        for _ in range(self.interpolate_tries):
            lam = _next_lambda(points, target)
            self._set_weights(model, weights_at(lam))
            got = estimate()
            points.append((lam, got))
            self.interpolation.append((lam, got))
            logger.info("interpolated toward the reference: lam %.3f, KL %.2f nats (budget %.2f)", lam, got, self.max_kl)
            if got < self.max_kl and (best is None or lam > best[0]):
                best = (lam, got)
            if self.interpolate_low * self.max_kl <= got < self.max_kl:
                break
        rollback_kl = dict(self.estimates).get(self._kept_at, 0.0) if self._kept_at else 0.0
        if best is not None and (best[1] >= self.interpolate_low * self.max_kl or best[1] >= rollback_kl):
            self._set_weights(model, weights_at(best[0]))
            self.kept_lambda = best[0]
        else:
            self._set_weights(model, trained)  # the rollback (or nothing) applies to the trained weights


def _lora_factors(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the LoRA ``A`` and ``B`` factors among ``model``'s parameters (peft's LoRA layers)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft, no adapters
        return set(), set()
    a, b = set(), set()
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for name, _ in module.named_parameters():
                full = f"{prefix}.{name}" if prefix else name
                if name.startswith(("lora_A.", "lora_embedding_A.")):
                    a.add(full)
                elif name.startswith(("lora_B.", "lora_embedding_B.")):
                    b.add(full)
    return a, b


def _next_lambda(points: Sequence[tuple[float, float]], target: float) -> float:
    """The next ``lam`` to try: where ``kl = c * lam ** p`` through the tried points that bracket ``target`` reaches
    it (``p = 2`` when the lower one is ``lam = 0``), kept strictly inside the bracket.

    >>> round(_next_lambda([(0.0, 0.0), (1.0, 16.0)], 4.0), 3)
    0.5
    >>> round(_next_lambda([(0.0, 0.0), (1.0, 16.0), (0.5, 2.0)], 4.0), 3)  # p = 3 between 0.5 and 1
    0.63
    """
    below = max((p for p in points if p[1] < target), key=lambda p: p[0])
    above = min((p for p in points if p[1] >= target and p[0] > below[0]), key=lambda p: p[0], default=None)
    if above is None:  # every try above lam came out under the target: go up from the highest
        return min(1.0, below[0] + (1.0 - below[0]) / 2)
    (l0, k0), (l1, k1) = below, above
    if l0 > 0 and k0 > 0:
        p = math.log(k1 / k0) / math.log(l1 / l0)
    else:
        p = 2.0
    lam = l1 * (target / k1) ** (1 / p) if p > 0 else (l0 + l1) / 2
    if not l0 < lam < l1:
        lam = (l0 + l1) / 2
    return lam
