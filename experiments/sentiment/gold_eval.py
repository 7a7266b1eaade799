"""Held-out evaluation of a policy against the reference, by the gold reward.

For every held-out prompt, ``n`` completions are sampled from the policy and from the reference with the same
seed and settings. Reported:

- ``gold``: mean gold reward (VADER compound) of the policy's completions;
- ``win_rate``: share of prompts where the policy's mean gold reward beats the reference's (ties count 1/2);
- ``kl``: KL(policy || reference) estimated on the policy's samples, ``mean_i sum_t (log pi - log ref)`` of
  sample ``i``'s tokens, both under the sampling temperature (the distributions actually sampled from);
- ``length``: mean completion length in tokens (EOS included when the completion has one).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sampling import GenerationSettings, Samples, sample, sequence_logps  # noqa: E402

__all__ = ["evaluate_policy", "kl_on_samples", "reference_samples", "win_rate"]


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float], n: int = 1) -> float:
    """Share of prompts where the mean of the policy's ``n`` scores beats the reference's; a tie counts 1/2.

    Scores are prompt-major (``n`` per prompt, one prompt after another).

    >>> win_rate([0.9, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.4], n=2)  # prompt 1: 0.5 > 0.2; prompt 2: 0.5 = 0.5
    0.75
    """
    if len(policy_scores) != len(reference_scores) or len(policy_scores) % n:
        raise ValueError("policy and reference need the same number of scores, n per prompt")
    p = torch.tensor(policy_scores, dtype=torch.float64).view(-1, n).mean(1)
    r = torch.tensor(reference_scores, dtype=torch.float64).view(-1, n).mean(1)
    return float(((p > r).double() + 0.5 * (p == r).double()).mean())


def kl_on_samples(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> float:
    """Monte-Carlo KL(policy || reference) from samples of the policy: ``mean_i (log pi(y_i) - log ref(y_i))``,
    each term the sum over sample ``i``'s tokens.

    >>> kl_on_samples(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -8.0]))
    2.0
    """
    if policy_logps.shape != reference_logps.shape:
        raise ValueError("one policy and one reference log-prob per sample")
    return float((policy_logps.double() - reference_logps.double()).mean())


def _scores(samples: Samples) -> list[float]:
    from hfrlhf.workflows.rewards import vader_sentiment

    return vader_sentiment(samples.prompts, samples.completions)


def reference_samples(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings,
                      *, n: int, seed: int) -> dict[str, Any]:
    """The reference's held-out samples and their gold scores. ``model`` is the base model (no adapter)."""
    s = sample(model, tokenizer, prompts, settings, n=n, seed=seed)
    scores = _scores(s)
    return {"completions": s.completions, "scores": scores, "lengths": [len(t) for t in s.token_ids],
            "gold": sum(scores) / len(scores), "length": sum(len(t) for t in s.token_ids) / len(s.token_ids)}


def evaluate_policy(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings,
                    reference: dict[str, Any], *, n: int, seed: int) -> dict[str, Any]:
    """Gold reward, win rate against ``reference`` (from :func:`reference_samples`), KL and length of a peft
    policy whose adapters off are the reference."""
    t0 = time.time()
    s = sample(model, tokenizer, prompts, settings, n=n, seed=seed)
    t1 = time.time()
    scores = _scores(s)
    logps = s.logps  # from the generation's own logits: one forward pass fewer (tests/test_alignment.py)
    if logps is None:
        logps = sequence_logps(model, tokenizer, s, temperature=settings.temperature)
    t2 = time.time()
    ref_logps = sequence_logps(model, tokenizer, s, temperature=settings.temperature, adapter_off=True)
    t3 = time.time()
    lengths = [len(t) for t in s.token_ids]
    return {
        "gold": sum(scores) / len(scores),
        "win_rate": win_rate(scores, reference["scores"], n),
        "kl": kl_on_samples(logps, ref_logps),
        "length": sum(lengths) / len(lengths),
        "eos_rate": sum(s.ended) / len(s.ended),
        "examples": [{"prompt": s.prompts[i // n], "completion": s.completions[i], "gold": scores[i]}
                     for i in range(0, min(len(scores), 3 * n), n)],
        "seconds": {"sample": t1 - t0, "reference_logps": t3 - t2},
        "completions": s.completions,
        "scores": scores,
    }
