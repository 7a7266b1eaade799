"""The stages of one on-policy RLHF step, each a function on tensors (PPO, RLOO, GRPO, REINFORCE++).

1. generate           sample, cut after the first stop token   ``RolloutCollator``, ``generate``, ``truncate_at_stop``
2. score              reward model at the last real token,     ``RewardScorer`` (``sequence_batch``,
                      or a Python callable                     ``score_with_model``, ``reward_model_batch``,
                                                               ``call_reward_fn``)
3. log-probs, values  old policy / reference log-probs         ``reference_logps``, ``to_grid``
4. rewards            score - beta * KL, per token             ``shape_scores``, ``token_kl``
5. advantages         GAE + whitening, RLOO, GRPO, REINFORCE++ ``compute_advantages``
6. updates            clipped losses, entropy, PTX             ``Rollout``, ``update_loss``

Layout. Prompts arrive left-padded from ``PromptCollator`` ``(B, Tp)`` with their mask; responses are
right-padded ``(B, Tr)`` with explicit ``lengths``. Every batch that goes into a model is rebuilt by
:func:`sequence_batch` from the real prompt tokens (selected with the prompt *mask*) and the first
``length`` response tokens, through the collators' index scheme: no position is ever inferred from
``input_ids != pad_token_id``, which fails when pad == EOS (SmolLM2, Llama-3, Qwen, ...).

Group layouts (``k`` samples per prompt) are prompt-major, as in ``hfrlhf.ops.advantages``: the ``k`` samples of
prompt ``p`` are rows ``p*k .. p*k + k - 1``, which ``repeat_interleave(k)`` on the prompt batch gives.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import GenerationConfig

from hfrlhf.data.collators import PromptCollator, Segment, build_batch
from hfrlhf.losses.base import LossOutput
from hfrlhf.losses.ppo import policy_loss, value_loss
from hfrlhf.models.reward_head import sequence_rewards
from hfrlhf.ops.advantages import (
    gae,
    grpo_advantages,
    per_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from hfrlhf.ops.casts import cached_linear_casts, shared_weight_casts
from hfrlhf.ops.kl import kl_estimate
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.ops.masked import AllReduce, RunningMoments, masked_mean, masked_sum, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS", "RewardFn", "RewardScorer", "Responses", "RolloutCollator", "call_reward_fn",
    "compute_advantages", "generate", "generate_with_logprobs", "make_generation_config", "reference_logps",
    "reward_model_batch", "score_with_model", "sequence_batch", "shape_scores", "to_grid", "token_kl",
    "truncate_at_stop", "Rollout", "update_loss",
]

RewardFn = Callable[[list[Any], list[str]], Any]
"""``reward_fn(prompts, completions) -> list[float] | Tensor``: one score per completion."""


class Responses(NamedTuple):
    """Sampled responses, right-padded, each ending at (and including) its first stop token.

    ``ids`` ``(B, Tr)`` long, ``pad_token_id`` after the end; ``lengths`` ``(B,)`` long, real tokens per row;
    ``ended`` ``(B,)`` bool, True when the row contains a stop token (False: cut at the length limit).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    ended: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``(B, Tr)`` bool, True on real response tokens."""
        cols = torch.arange(self.ids.shape[1], device=self.ids.device)
        return cols.unsqueeze(0) < self.lengths.unsqueeze(1)

    def select(self, index: torch.Tensor) -> Responses:
        """The rows in ``index`` (a long tensor)."""
        return Responses(self.ids[index], self.lengths[index], self.ended[index])


class RolloutCollator:
    """``PromptCollator``'s left-padded ``input_ids`` / ``attention_mask`` ``(P, Tp)``, plus ``prompts``: the raw
    prompts (text or messages) that reward functions and re-tokenizing reward models read. Records without a
    ``prompt`` column (pre-tokenized data) get their decoded prompt text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.collate = PromptCollator(tokenizer.pad_token_id)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.collate(features)
        batch["prompts"] = [f["prompt"] if f.get("prompt") is not None
                            else self.tokenizer.decode(f["prompt_ids"], skip_special_tokens=True) for f in features]
        return batch


# --- 1. generate ---------------------------------------------------------------------------------------------------
def make_generation_config(
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
) -> GenerationConfig:
    """Sampling settings for rollouts: ancestral sampling at ``temperature``, optionally top-k / top-p."""
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k or 0,
        top_p=top_p,
        eos_token_id=list(stop_token_ids) or None,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


@torch.no_grad()
def generate(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation_config: GenerationConfig
) -> torch.Tensor:
    """Sample one response per prompt row. ``(B, Tp)`` left-padded prompts -> ``(B, Tr)`` generated tokens.

    The output is what ``generate`` wrote after the prompt, not yet cut: pass it to :func:`truncate_at_stop`.
    Frozen weights are cast to the autocast dtype once for the whole call, not at every token (the same numbers).
    """
    with _sampling_casts(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)
    return out[:, prompt_ids.shape[1]:]


@torch.no_grad()
def generate_with_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation_config: GenerationConfig,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`generate`, plus the log-prob of every generated token under ``model`` at ``temperature``.

    Returns ``(B, Tr)`` tokens and ``(B, Tr)`` float32 log-probs ``log softmax(logits / temperature)`` of the
    token taken at each step, from the raw logits ``generate`` computed anyway (no second forward pass). They
    match a teacher-forced pass over prompt + response (``batch_logprobs`` on :func:`sequence_batch`) up to
    float rounding (the cached decode multiplies in another order). Positions after a row's stop token hold
    log-probs of padding: mask them with the lengths of :func:`truncate_at_stop`. Frozen weights are cast to the
    autocast dtype once for the whole call (the same numbers).
    """
    config = copy.deepcopy(generation_config)
    config.output_logits, config.return_dict_in_generate = True, True
    with _sampling_casts(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    tokens = out.sequences[:, prompt_ids.shape[1]:]  # (B, Tr)
    logps = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, step_logits in enumerate(out.logits):  # Tr tensors (B, V), one per generated token
        step = torch.log_softmax(step_logits.float() / temperature, dim=-1)
        logps[:, t] = step.gather(1, tokens[:, t:t + 1]).squeeze(1)
    return tokens, logps


@contextlib.contextmanager
def _sampling_casts(model: nn.Module) -> Iterator[None]:
    """Frozen linear weights cast once for a whole sampling call (bit-identical to casting them at every token)."""
    with shared_weight_casts(), cached_linear_casts(model):
        yield


def truncate_at_stop(ids: torch.Tensor, stop_token_ids: Sequence[int], pad_token_id: int) -> Responses:
    """Cut every row after its first stop token (kept) and pad the rest; rows without one keep every token.

    Shapes: ``ids (B, Tr)`` -> :class:`Responses`. The stop token may equal the pad token: lengths come from
    the *first* stop token, never from counting non-pad tokens.

    >>> r = truncate_at_stop(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]]), [2], pad_token_id=2)
    >>> r.ids, r.lengths, r.ended
    (tensor([[5, 2, 2, 2],
            [5, 6, 7, 8],
            [2, 2, 2, 2]]), tensor([2, 4, 1]), tensor([ True, False,  True]))
    """
    width = ids.shape[1]
    if stop_token_ids:
        is_stop = torch.isin(ids, torch.tensor(list(stop_token_ids), device=ids.device))
    else:
        is_stop = torch.zeros_like(ids, dtype=torch.bool)
    ended = is_stop.any(dim=1)
    first = is_stop.to(torch.int8).argmax(dim=1)  # index of the first stop token (0 when there is none)
    lengths = torch.where(ended, first + 1, torch.full_like(first, width))
    cols = torch.arange(width, device=ids.device).unsqueeze(0)
    return Responses(torch.where(cols < lengths.unsqueeze(1), ids, torch.full_like(ids, pad_token_id)), lengths, ended)


# --- 2. score ------------------------------------------------------------------------------------------------------
def sequence_batch(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: Responses, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Prompt + response of every row as one right-padded batch in the collators' index scheme.

    The scored tokens are the response tokens, in order, so ``target_seq`` / ``pred_index`` address them and
    ``last_index`` is each response's last real token (its stop token when it has one): where a reward model
    reads its score. The prompt of a row is ``prompt_ids[b][prompt_mask[b]]``, whatever the padding side.

    >>> prompts, mask = torch.tensor([[2, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])  # pad == eos == 2
    >>> resp = truncate_at_stop(torch.tensor([[3, 2, 2], [4, 4, 4]]), [2], pad_token_id=2)
    >>> b = sequence_batch(prompts, mask, resp, pad_token_id=2)
    >>> b["input_ids"]
    tensor([[5, 6, 3, 2, 2, 2],
            [7, 8, 9, 4, 4, 4]])
    >>> b["last_index"], b["target_index"]
    (tensor([ 3, 11]), tensor([ 2,  3,  9, 10, 11]))
    """
    keep = prompt_mask.bool().cpu()
    p_ids, r_ids, lengths = prompt_ids.cpu(), responses.ids.cpu(), responses.lengths.tolist()
    sequences = []
    for b, length in enumerate(lengths):
        prompt = p_ids[b][keep[b]].tolist()
        if not prompt:
            raise ValueError(f"row {b} has an empty prompt: the first response token would have no predecessor")
        sequences.append([Segment(prompt, False), Segment(r_ids[b, :length].tolist(), True)])
    batch = build_batch(sequences, pad_token_id)
    return {k: v.to(prompt_ids.device) for k, v in batch.items()}


@torch.no_grad()
def score_with_model(reward_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(S,)`` float32 scores: the reward model's scalar head on the hidden state at ``batch["last_index"]``
    (:func:`hfrlhf.models.reward_head.sequence_rewards`, without gradients; a ``RewardEnsemble`` works too).

    The decoder runs once and the head reads exactly one position per sequence, given by the index scheme
    (the model's own "last non-pad token" search is never used: with pad == EOS it lands on the wrong token).
    """
    return sequence_rewards(reward_model, batch)


def reward_model_batch(
    tokenizer: Any, prompts: Sequence[Any], completions: Sequence[str], ended: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Re-tokenize prompt + completion text for a reward model that has its own tokenizer.

    The rules are those the reward model's training data went through (``hfrlhf.data.tokenize``): chat
    prompts get the reward tokenizer's chat template with the completion as the assistant turn, text prompts
    are tokenized as text, and a completion ends with one EOS. A response the policy did not finish
    (``ended`` False) is scored without that EOS, as it would be with the policy's own tokens.
    """
    from hfrlhf.data.tokenize import tokenize_prompt_completion

    eos = tokenizer.eos_token_id
    sequences = []
    for prompt, text, done in zip(prompts, completions, ended.tolist()):
        chat = not isinstance(prompt, str)
        completion: Any = [{"role": "assistant", "content": text}] if chat else text
        pair = tokenize_prompt_completion(tokenizer, prompt, completion)
        ids = list(pair.completion_ids)
        if not done and ids and ids[-1] == eos:
            ids = ids[:-1]
        sequences.append([Segment(pair.prompt_ids, False), Segment(ids, True)])
    return build_batch(sequences, tokenizer.pad_token_id)


def call_reward_fn(
    reward_fn: RewardFn, prompts: list[Any], completions: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Call ``reward_fn(prompts, completions)`` and check it returned one finite number per completion.

    >>> call_reward_fn(lambda p, c: [len(x) for x in c], ["a", "b"], ["hi", "hello"])
    tensor([2., 5.])
    """
    out = reward_fn(prompts, completions)
    scores = torch.as_tensor(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=torch.float32)
    scores = scores.reshape(-1)
    if scores.numel() != len(completions):
        raise ValueError(f"the reward function returned {scores.numel()} scores for {len(completions)} completions")
    if not torch.isfinite(scores).all():
        raise ValueError(f"the reward function returned non-finite scores: {scores.tolist()}")
    return scores.to(device)


class RewardScorer:
    """Stage 2 as one callable: ``scorer(prompts, completions, batch, ended) -> (B,)`` float32 scores.

    ``reward`` is a Python function ``(prompts, completions) -> scores`` or a reward model (a sequence classifier).
    A reward model reads the policy's own tokens (``batch`` from :func:`sequence_batch`) when it shares the
    policy's vocabulary, and re-tokenized text (:func:`reward_model_batch`) when ``reward_tokenizer`` differs.
    """

    def __init__(self, reward: nn.Module | RewardFn, tokenizer: Any, reward_tokenizer: Any = None) -> None:
        is_model = isinstance(reward, nn.Module)
        if not is_model and not callable(reward):
            raise TypeError(f"reward must be a model or a callable, got {type(reward).__name__}")
        self.model: nn.Module | None = reward if is_model else None
        self.fn: RewardFn | None = None if is_model else reward
        self.reward_tokenizer = reward_tokenizer
        self.retokenize = is_model and reward_tokenizer is not None and not (
            reward_tokenizer is tokenizer or reward_tokenizer.get_vocab() == tokenizer.get_vocab())

    def __call__(
        self, prompts: list[Any], completions: list[str], batch: dict[str, torch.Tensor], ended: torch.Tensor
    ) -> torch.Tensor:
        device = batch["input_ids"].device
        if self.fn is not None:
            return call_reward_fn(self.fn, prompts, completions, device)
        assert self.model is not None
        if self.retokenize:
            batch = {k: v.to(device) for k, v in reward_model_batch(self.reward_tokenizer, prompts, completions, ended).items()}
        return score_with_model(self.model, batch)


# --- 3. log-probs and values ----------------------------------------------------------------------------------------
def to_grid(flat: torch.Tensor, batch: Mapping[str, torch.Tensor], lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Per-scored-token values ``(N,)`` of a :func:`sequence_batch` -> right-padded ``(B, width)``, 0 on pads.

    Differentiable. Scored tokens are ordered by sequence, then position, and sequence ``b`` has exactly
    ``lengths[b]`` of them, so token ``n`` sits at column ``n - offset[target_seq[n]]``.

    >>> b = {"target_seq": torch.tensor([0, 0, 1])}
    >>> to_grid(torch.tensor([1.0, 2.0, 3.0]), b, torch.tensor([2, 1]), width=3)
    tensor([[1., 2., 0.],
            [3., 0., 0.]])
    """
    seq = batch["target_seq"]
    if flat.shape[0] != seq.shape[0] or int(lengths.sum()) != seq.shape[0]:
        raise ValueError(f"{flat.shape[0]} values for {seq.shape[0]} scored tokens and {int(lengths.sum())} response tokens")
    offsets = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(seq.shape[0], device=seq.device) - offsets[seq]
    grid = flat.new_zeros((lengths.shape[0], width))
    return grid.index_put((seq, cols), flat)


@torch.no_grad()
def reference_logps(
    policy: nn.Module,
    batch: dict[str, torch.Tensor],
    ref_model: nn.Module | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``(N,)`` log-probs of the scored tokens under the reference: ``ref_model``, or else the (peft) policy
    with every adapter disabled, which is the base model with no second copy in memory."""
    if ref_model is not None:
        return batch_logprobs(ref_model, batch, chunk_size=chunk_size, temperature=temperature).token_logps
    inner = policy
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("no reference: pass ref_model, or use a peft policy whose base model is the reference")
    with inner.disable_adapter():
        return batch_logprobs(inner, batch, chunk_size=chunk_size, temperature=temperature).token_logps


# --- 4. rewards ------------------------------------------------------------------------------------------------------
def shape_scores(
    scores: torch.Tensor,
    ended: torch.Tensor,
    *,
    missing_eos_penalty: float | None = None,
    running: RunningMoments | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Scores as the policy is trained on them, in this order:

    1. ``missing_eos_penalty`` is subtracted from responses cut at the length limit (TRL's rule);
    2. with ``running``, the statistics are updated with this batch and scores become
       ``(s - running_mean) / running_std`` (a running normalisation, as DeepSpeed-Chat and OpenRLHF do);
    3. with ``clip``, scores are clamped to ``[-clip, clip]``.

    Shapes: ``(B,)`` -> ``(B,)``.

    >>> shape_scores(torch.tensor([1.0, 5.0]), torch.tensor([True, False]), missing_eos_penalty=1.0, clip=3.0)
    tensor([1., 3.])
    """
    out = scores.float()
    if missing_eos_penalty:
        out = out - missing_eos_penalty * (~ended).to(out.dtype)
    if running is not None:
        running.update(out)
        out = (out - running.mean) / running.std
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def token_kl(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate (``k1``/``k2``/``k3``, ``hfrlhf.ops.kl``), 0 on pads. ``(B, T)``."""
    kl = kl_estimate(logps, ref_logps, estimator)  # type: ignore[arg-type]
    return torch.where(mask, kl, torch.zeros_like(kl))


# --- 5. advantages ---------------------------------------------------------------------------------------------------
class _AdvantageInputs(NamedTuple):
    scores: torch.Tensor  # (B,)
    kl: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool
    values: torch.Tensor | None  # (B, T)
    beta: float
    gamma: float
    lam: float
    k: int
    whiten_rewards: bool
    whiten_advantages: bool
    all_reduce: AllReduce | None


def _gae(x: _AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.values is None:
        raise ValueError("GAE needs critic values")
    rewards = per_token_rewards(x.scores, x.kl, x.mask, x.beta)
    if x.whiten_rewards:
        rewards = masked_whiten(rewards, x.mask, shift_mean=False, all_reduce=x.all_reduce)
    adv, returns = gae(rewards, x.values, x.mask, x.gamma, x.lam)
    if x.whiten_advantages:
        adv = masked_whiten(adv, x.mask, all_reduce=x.all_reduce)
    return adv, returns


def _sequence_level(fn: Callable[[torch.Tensor, int], torch.Tensor], whiten: bool):
    def estimator(x: _AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        # KL enters the sequence reward (RLOO's choice): r = score - beta * sum_t KL_t
        seq_reward = x.scores - x.beta * masked_sum(x.kl, x.mask, dim=1)
        adv = fn(seq_reward, x.k).unsqueeze(1).expand_as(x.kl)
        adv = torch.where(x.mask, adv, torch.zeros_like(adv))
        if whiten and x.whiten_advantages:
            adv = masked_whiten(adv, x.mask, all_reduce=x.all_reduce)
        return adv, None

    return estimator


def _reinforce_pp(x: _AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    adv, _ = reinforce_pp_advantages(x.scores, x.kl, x.mask, x.beta, x.gamma, k=x.k if x.k > 1 else None,
                                     all_reduce=x.all_reduce)
    return adv, None


ADVANTAGE_ESTIMATORS: dict[str, Callable[[_AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "gae": _gae,
    "rloo": _sequence_level(rloo_advantages, whiten=True),
    "grpo": _sequence_level(grpo_advantages, whiten=False),  # already scaled per group
    "reinforce_pp": _reinforce_pp,  # whitened over the global batch inside
}


def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    beta: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    k: int = 1,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
    all_reduce: AllReduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages ``(B, T)`` and, for GAE, value targets ``(B, T)`` (None otherwise); 0 on pads.

    - ``"gae"``: rewards ``r_t = -beta KL_t + [t = last] score`` (optionally whitened without moving their
      mean, ``whiten_rewards``), GAE(gamma, lam) with the critic's ``values``, advantages whitened
      (lm-human-preference-details).
    - ``"rloo"`` / ``"grpo"``: sequence reward ``score - beta sum_t KL_t``, leave-one-out or group-normalised
      over the ``k`` samples of each prompt, the same advantage on every token (RLOO's optionally whitened).
    - ``"reinforce_pp"``: REINFORCE++ (with the group-mean baseline when ``k > 1``).

    >>> m = torch.tensor([[True, True], [True, False]])
    >>> adv, ret = compute_advantages("rloo", torch.tensor([1.0, 3.0]), torch.zeros(2, 2), m, k=2, whiten_advantages=False)
    >>> adv, ret
    (tensor([[-2., -2.],
            [ 2.,  0.]]), None)
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    mask = mask.bool()
    inputs = _AdvantageInputs(scores.float(), kl.float(), mask, None if values is None else values.float(),
                              float(beta), gamma, lam, k, whiten_rewards, whiten_advantages, all_reduce)
    return ADVANTAGE_ESTIMATORS[estimator](inputs)


# --- 6. updates ------------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """What stages 1-5 produce for ``B`` responses and the updates consume. ``Tr`` = response width."""

    prompt_ids: torch.Tensor  # (B, Tp) left-padded
    prompt_mask: torch.Tensor  # (B, Tp)
    responses: Responses
    logps: torch.Tensor  # (B, Tr) log-probs at sampling time ("old")
    values: torch.Tensor | None  # (B, Tr) critic values at sampling time, None without critic
    advantages: torch.Tensor  # (B, Tr)
    returns: torch.Tensor | None  # (B, Tr) value targets, None without critic

    def select(self, index: torch.Tensor) -> Rollout:
        """The responses in ``index`` (a long tensor)."""
        return Rollout(*(f.select(index) if isinstance(f, Responses) else (None if f is None else f[index])
                         for f in self))


def update_loss(
    out: Any,
    batch: Mapping[str, torch.Tensor],
    rollout: Rollout,
    *,
    cliprange: float = 0.2,
    cliprange_value: float | None = 0.2,
    vf_coef: float = 0.1,
    entropy_coef: float = 0.0,
    ptx_coef: float = 0.0,
) -> LossOutput:
    """The loss of one micro-batch of updates:

        L = L_clip(policy) + vf_coef * L_clip(value) - entropy_coef * H + ptx_coef * NLL_ptx

    Args:
        out: the forward of :class:`hfrlhf.models.value.ActorCritic` on ``batch`` (fields ``logps``, ``values``,
            ``entropy`` over the ``N`` scored tokens, and ``ptx_loss``).
        batch: :func:`sequence_batch` of ``rollout``'s responses.
        rollout: the micro-batch's part of the rollout.

    Returns:
        ``LossOutput`` with the losses' metrics (``policy/clipfrac``, ``policy/approxkl``, ``val/*``,
        ``loss/policy``, ``loss/value``), ``policy/entropy_avg`` and ``loss/ptx``.
    """
    responses, mask = rollout.responses, rollout.responses.mask
    width = responses.ids.shape[1]

    def grid(flat: torch.Tensor) -> torch.Tensor:
        return to_grid(flat, batch, responses.lengths, width)

    pol = policy_loss(grid(out.logps), rollout.logps, rollout.advantages, mask, cliprange)
    loss, metrics = pol.loss, dict(pol.metrics)
    if out.values is not None:
        if rollout.values is None or rollout.returns is None:
            raise ValueError("the forward has values but the rollout has no old values / returns")
        val = value_loss(grid(out.values), rollout.values, rollout.returns, mask, cliprange_value)
        loss = loss + vf_coef * val.loss
        metrics.update(val.metrics)
    entropy = masked_mean(grid(out.entropy), mask)
    if entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    metrics["policy/entropy_avg"] = entropy.detach()
    if out.ptx_loss is not None:
        loss = loss + ptx_coef * out.ptx_loss
        metrics["loss/ptx"] = out.ptx_loss.detach()
    return LossOutput(loss, metrics)
