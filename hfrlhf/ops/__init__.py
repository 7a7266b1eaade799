"""Tensor operations shared by the trainers: log-probs, masked statistics, KL, advantages."""

from hfrlhf.ops.advantages import (
    gae,
    grpo_advantages,
    per_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from hfrlhf.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate
from hfrlhf.ops.logprobs import SequenceLogprobs, batch_logprobs, linear_logprob
from hfrlhf.ops.masked import RunningMoments, masked_mean, masked_whiten

__all__ = [
    "AdaptiveKLController", "FixedKLController", "RunningMoments", "SequenceLogprobs", "batch_logprobs", "gae",
    "grpo_advantages", "kl_estimate", "linear_logprob", "masked_mean", "masked_whiten", "per_token_rewards",
    "reinforce_pp_advantages", "rloo_advantages",
]
