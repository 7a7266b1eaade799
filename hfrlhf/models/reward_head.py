"""Reward models as scalar heads on a decoder: build one from a causal LM, read it, score text with it.

A reward model here is any decoder with a one-output head that :func:`hfrlhf.models.loading.score_head`
finds (``score`` for Hugging Face sequence classifiers). The reward of a sequence is the head applied to
the hidden state of its last real token, its EOS, located by the batch's ``last_index`` (see
``hfrlhf.data.collators``), so padding side, packing and ``pad == eos`` never move it.

>>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
>>> tok = build_tiny_tokenizer()
>>> reward_model = reward_model_from_causal_lm(build_tiny_llama(tok))
>>> score_completions(reward_model, tok, ["Say hi.", "Say hi."], [" Hi there!", " No."]).shape
torch.Size([2])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from hfrlhf.data.collators import Segment, build_batch
from hfrlhf.models.loading import score_head
from hfrlhf.ops.logprobs import hidden_states

__all__ = ["RewardEnsemble", "reward_model_from_causal_lm", "score_completions", "sequence_rewards"]


def sequence_rewards(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One scalar reward per sequence ``(S,)`` float32, read at each sequence's last token (``last_index``).

    The decoder runs once on the batch's layout (padded on either side, packed, shared-prompt) and the
    score head is applied only to the ``S`` hidden states at ``last_index``. Works for HF sequence
    classifiers (``score``) and any decoder with a scalar head that ``score_head`` finds, LoRA-wrapped or
    not; gradients flow (wrap it in ``torch.no_grad()`` to only score). A :class:`RewardEnsemble` gives its
    combined reward.
    """
    if isinstance(model, RewardEnsemble):
        return model.rewards(batch)
    hidden = hidden_states(model, dict(batch))  # (R, T, H)
    last = hidden.reshape(-1, hidden.shape[-1])[batch["last_index"]]  # (S, H)
    head = score_head(model)
    return head(last.to(next(head.parameters()).dtype)).reshape(-1).float()


COMBINE_RULES = ("mean", "min", "mean_minus_std")


class RewardEnsemble(nn.Module):
    """Several reward models scored as one, a guard against a policy exploiting one model's errors.

    Each member's reward is first standardised, ``(r - offset) / scale`` (see :meth:`standardize`, so a member
    with a steeper head does not outvote the others), then the members are combined per sequence:

    - ``"mean"``: their average;
    - ``"min"``: the most pessimistic member (worst-case optimisation, Coste et al. 2023);
    - ``"mean_minus_std"``: the average minus ``std_coef`` times the members' standard deviation, so a sequence
      the members disagree on, typically one unlike the reward data, is worth less (uncertainty-weighted).

    Members must read the same tokens (one tokenizer). Wherever a reward model is scored through
    :func:`sequence_rewards` (``score_completions``, PPO's rollouts) the ensemble is used as it is.

    >>> from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> ensemble = RewardEnsemble([reward_model_from_causal_lm(build_tiny_llama(tok)) for _ in range(2)])
    >>> score_completions(ensemble, tok, ["Say hi."] * 3, [" Hi!", " No.", " Hello there."]).shape
    torch.Size([3])
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "mean", std_coef: float = 1.0) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("a RewardEnsemble needs at least one member")
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine={combine!r}: expected one of {', '.join(COMBINE_RULES)}")
        if std_coef < 0:
            raise ValueError(f"std_coef={std_coef} must be >= 0")
        self.members = nn.ModuleList(members)
        self.combine, self.std_coef = combine, float(std_coef)
        self.register_buffer("offset", torch.zeros(len(members)))
        self.register_buffer("scale", torch.ones(len(members)))
        self.config = getattr(members[0], "config", None)

    def member_rewards(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(M, S)``: each member's standardised reward of each sequence."""
        raw = torch.stack([sequence_rewards(m, batch) for m in self.members])
        return (raw - self.offset[:, None].to(raw)) / self.scale[:, None].to(raw)

    def rewards(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(S,)`` float32: the combined reward."""
        return self.combine_rewards(self.member_rewards(batch))

    def combine_rewards(self, member_rewards: torch.Tensor) -> torch.Tensor:
        """``(M, S) -> (S,)`` by the ensemble's rule (the standard deviation is the population one).

        >>> e = RewardEnsemble([nn.Linear(1, 1), nn.Linear(1, 1)], combine="mean_minus_std", std_coef=0.5)
        >>> e.combine_rewards(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        tensor([1.5000, 0.0000])
        """
        if self.combine == "min":
            return member_rewards.min(dim=0).values
        mean = member_rewards.mean(dim=0)
        if self.combine == "mean_minus_std":
            return mean - self.std_coef * member_rewards.std(dim=0, unbiased=False)
        return mean

    @torch.no_grad()
    def standardize(self, raw_member_rewards: torch.Tensor) -> None:
        """Set each member's offset and scale to the mean and standard deviation of its raw rewards
        ``(M, N)`` over a calibration set (the same ``N`` completions for every member, e.g. the reward data).

        >>> e = RewardEnsemble([nn.Linear(1, 1), nn.Linear(1, 1)])
        >>> e.standardize(torch.tensor([[0.0, 2.0], [10.0, 30.0]]))
        >>> e.offset.tolist(), e.scale.tolist()
        ([1.0, 20.0], [1.0, 10.0])
        """
        raw = raw_member_rewards.float()
        if raw.dim() != 2 or raw.shape[0] != len(self.members) or raw.shape[1] < 2:
            raise ValueError(f"expected ({len(self.members)}, N >= 2) raw rewards, got {tuple(raw.shape)}")
        std = raw.std(dim=1, unbiased=False)
        if bool((std <= 0).any()):
            raise ValueError("a member gives every calibration completion the same reward: it cannot be standardised")
        self.offset.copy_(raw.mean(dim=1))
        self.scale.copy_(std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Hugging Face style: ``.logits`` ``(B, 1)``, the combined reward of each row (each member runs its
        own forward and reads its own last token)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        raw = torch.stack([m(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.reshape(-1).float()
                           for m in self.members])
        std = (raw - self.offset[:, None].to(raw)) / self.scale[:, None].to(raw)
        return SequenceClassifierOutput(logits=self.combine_rewards(std)[:, None])


def reward_model_from_causal_lm(model: PreTrainedModel) -> PreTrainedModel:
    """A one-label ``AutoModelForSequenceClassification`` that shares ``model``'s decoder (no copy).

    The new ``score`` head is initialised with ``config.initializer_range``; the LM head is dropped. The
    result saves and reloads as an ordinary reward checkpoint.
    """
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    with torch.device("meta"):  # no memory for the throwaway decoder built by the constructor
        reward = AutoModelForSequenceClassification.from_config(config)
    setattr(reward, reward.base_model_prefix, getattr(model, model.base_model_prefix))
    ref = next(model.parameters())
    hidden_size = config.get_text_config().hidden_size
    head = nn.Linear(hidden_size, 1, bias=False, device=ref.device, dtype=ref.dtype)
    nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    reward.score = head
    if any(p.is_meta for p in reward.parameters()) or any(b.is_meta for b in reward.buffers()):
        raise ValueError(f"cannot turn {type(model).__name__} into a reward model: its sequence classifier has "
                         "modules besides the decoder and 'score'; load it with load_reward_model instead")
    return reward


@torch.no_grad()
def score_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> torch.Tensor:
    """Rewards ``(N,)`` of ``completions[i]`` given ``prompts[i]`` (text or chat messages).

    Tokenized exactly as for training (one EOS at the end, where the reward is read); the model is scored
    in eval mode and left in the mode it was in.
    """
    from hfrlhf.data.tokenize import tokenize_prompt_completion

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            sequences = []
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
                pair = tokenize_prompt_completion(tokenizer, p, c, max_length=max_length)
                sequences.append([Segment(pair.prompt_ids, False), Segment(pair.completion_ids, True)])
            batch = {k: v.to(device) for k, v in build_batch(sequences, pad).items()}
            out.append(sequence_rewards(model, batch).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
