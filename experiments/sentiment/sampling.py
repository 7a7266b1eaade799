"""Batched sampling and scoring with the library's rollout helpers, shared by ``make_data`` and ``gold_eval``.

Prompts are rendered with the model's chat template, left-padded by the library's ``RolloutCollator`` and
sampled many at a time; responses are cut at the first stop token with ``truncate_at_stop``. Log-probs of the
sampled tokens are taken with ``sequence_batch`` + ``batch_logprobs`` (the same index scheme the trainers use).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hfrlhf.data.tokenize import tokenize_prompt_completion
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.ops.rollout import (
    Responses,
    RolloutCollator,
    generate_with_logprobs,
    make_generation_config,
    sequence_batch,
    truncate_at_stop,
)

__all__ = ["GenerationSettings", "Samples", "prompt_ids", "sample", "scoring_batches", "sequence_logps"]


@dataclass(frozen=True)
class GenerationSettings:
    """How every completion of the experiment is sampled (recorded next to the data it makes)."""

    max_new_tokens: int = 40
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float = 1.0
    batch_size: int = 50

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Samples:
    """``n`` sampled completions per prompt, prompt-major: completion ``i`` answers ``prompts[i // n]``."""

    prompts: list[str]
    n: int
    completions: list[str]
    token_ids: list[list[int]]  # response tokens, stop token included when there is one
    ended: list[bool]
    logps: torch.Tensor | None = None  # (S,) summed log-probs of each completion's tokens at the temperature


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as a one-turn chat with the generation prompt (the library's tokenizer rules)."""
    out = []
    for p in prompts:
        pair = tokenize_prompt_completion(tokenizer, [{"role": "user", "content": p}],
                                          [{"role": "assistant", "content": "x"}])
        out.append(list(pair.prompt_ids))
    return out


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings, *,
           n: int = 1, seed: int = 0) -> Samples:
    """Sample ``n`` completions for each prompt, ``settings.batch_size`` sequences per ``generate`` call.

    The random stream restarts from ``seed`` (and is left as it was afterwards), so the policy and the reference
    sampled with the same seed see the same noise wherever their distributions agree. ``Samples.logps`` holds the
    sampling model's log-prob of each completion at ``settings.temperature``, read from the logits of the
    generation itself (what :func:`sequence_logps` would compute with a second pass, up to float rounding).
    """
    was_training = model.training
    model.eval()
    collate = RolloutCollator(tokenizer)
    stops = [tokenizer.eos_token_id]
    config = make_generation_config(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                    top_k=settings.top_k, top_p=settings.top_p, stop_token_ids=stops,
                                    pad_token_id=tokenizer.pad_token_id)
    ids = prompt_ids(tokenizer, prompts)
    rows = [(p, i) for p, i in zip(prompts, ids) for _ in range(n)]
    completions, tokens, ended, logps = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), settings.batch_size):
            chunk = rows[start:start + settings.batch_size]
            batch = collate([{"prompt": p, "prompt_ids": i} for p, i in chunk])
            generated, token_logps = generate_with_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                            config, settings.temperature)
            out = truncate_at_stop(generated, stops, tokenizer.pad_token_id)
            logps.append((token_logps * out.mask).sum(1))  # (B,) over each completion's real tokens
            for row, length, done in zip(out.ids.tolist(), out.lengths.tolist(), out.ended.tolist()):
                tokens.append(row[:length])
                ended.append(bool(done))
            completions += tokenizer.batch_decode([t for t in tokens[-len(chunk):]], skip_special_tokens=True)
    model.train(was_training)
    return Samples(list(prompts), n, [c.strip() for c in completions], tokens, ended, torch.cat(logps))


@torch.no_grad()
def sequence_logps(model: nn.Module, tokenizer: Any, samples: Samples, *, temperature: float = 1.0,
                   batch_size: int = 50, adapter_off: bool = False) -> torch.Tensor:
    """``(S,)`` summed log-probs of each sampled completion's tokens under ``model`` at ``temperature``.

    With ``adapter_off`` a peft ``model`` is scored with its adapters disabled (the reference).
    """
    was_training = model.training
    model.eval()
    out = []
    context = model.disable_adapter() if adapter_off else nullcontext()
    with context:
        for seq in scoring_batches(tokenizer, samples, batch_size):
            out.append(batch_logprobs(model, seq, temperature=temperature).seq_logps.float())
    model.train(was_training)
    return torch.cat(out)


def scoring_batches(tokenizer: Any, samples: Samples, batch_size: int = 50) -> Iterator[dict[str, torch.Tensor]]:
    """The sampled completions with their prompts, ``batch_size`` at a time, as ``sequence_batch`` batches (the
    index scheme ``batch_logprobs`` scores), in the order of ``samples.token_ids``."""
    collate = RolloutCollator(tokenizer)
    ids = prompt_ids(tokenizer, samples.prompts)
    for start in range(0, len(samples.token_ids), batch_size):
        idx = range(start, min(start + batch_size, len(samples.token_ids)))
        batch = collate([{"prompt": "", "prompt_ids": ids[i // samples.n]} for i in idx])
        width = max(len(samples.token_ids[i]) for i in idx)
        resp = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        for r, i in enumerate(idx):
            resp[r, :len(samples.token_ids[i])] = torch.tensor(samples.token_ids[i])
        lengths = torch.tensor([len(samples.token_ids[i]) for i in idx])
        responses = Responses(resp, lengths, torch.tensor([samples.ended[i] for i in idx]))
        yield sequence_batch(batch["input_ids"], batch["attention_mask"], responses, tokenizer.pad_token_id)
