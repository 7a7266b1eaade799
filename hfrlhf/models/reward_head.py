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

__all__ = ["reward_model_from_causal_lm", "score_completions", "sequence_rewards"]


def sequence_rewards(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One scalar reward per sequence ``(S,)`` float32, read at each sequence's last token (``last_index``).

    The decoder runs once on the batch's layout (padded on either side, packed, shared-prompt) and the
    score head is applied only to the ``S`` hidden states at ``last_index``. Works for HF sequence
    classifiers (``score``) and any decoder with a scalar head that ``score_head`` finds, LoRA-wrapped or
    not; gradients flow (wrap it in ``torch.no_grad()`` to only score).
    """
    hidden = hidden_states(model, dict(batch))  # (R, T, H)
    last = hidden.reshape(-1, hidden.shape[-1])[batch["last_index"]]  # (S, H)
    head = score_head(model)
    return head(last.to(next(head.parameters()).dtype)).reshape(-1).float()


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
