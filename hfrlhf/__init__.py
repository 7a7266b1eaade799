"""hfrlhf: RLHF as ``transformers.Trainer`` subclasses.

>>> from hfrlhf import DPOTrainer, DPOConfig  # doctest: +SKIP

Public names are imported lazily, so ``import hfrlhf`` stays fast and a trainer's dependencies load only
when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # trainers and configs
    "DPOConfig": "hfrlhf.trainers.dpo", "DPOTrainer": "hfrlhf.trainers.dpo",
    "RewardConfig": "hfrlhf.trainers.reward", "RewardTrainer": "hfrlhf.trainers.reward",
    "KTOConfig": "hfrlhf.trainers.kto", "KTOTrainer": "hfrlhf.trainers.kto",
    "PPOConfig": "hfrlhf.trainers.ppo", "PPOTrainer": "hfrlhf.trainers.ppo",
    "SFTConfig": "hfrlhf.trainers.sft", "SFTTrainer": "hfrlhf.trainers.sft",
    "HfrlhfConfig": "hfrlhf.trainers.base", "HfrlhfTrainer": "hfrlhf.trainers.base",
    # trainer-side data helpers
    "KTOCollator": "hfrlhf.trainers.kto", "add_kl_partners": "hfrlhf.trainers.kto",
    "compute_accuracy": "hfrlhf.trainers.reward",
    # training to a KL budget
    "KLBudgetCallback": "hfrlhf.callbacks", "sample_kl": "hfrlhf.callbacks",
    # data
    "load_dataset": "hfrlhf.data.formats",
    "DataError": "hfrlhf.data.errors",
    "EXAMPLES_DIR": "hfrlhf.data.formats",
    "tokenize_dataset": "hfrlhf.data.tokenize",
    "PairwiseCollator": "hfrlhf.data.collators", "ListwiseCollator": "hfrlhf.data.collators",
    "UnpairedCollator": "hfrlhf.data.collators", "PointwiseCollator": "hfrlhf.data.collators",
    "PromptCollator": "hfrlhf.data.collators", "SFTCollator": "hfrlhf.data.collators",
    # models
    "ModelArguments": "hfrlhf.models.loading", "load_bundled": "hfrlhf.models.loading",
    "load_causal_lm": "hfrlhf.models.loading", "load_reward_model": "hfrlhf.models.loading",
    "load_tokenizer": "hfrlhf.models.loading", "get_peft_config": "hfrlhf.models.loading",
    "get_quantization_config": "hfrlhf.models.loading", "bf16_supported": "hfrlhf.models.loading",
    "keep_4bit_weights_trainable": "hfrlhf.models.quantized",
    # reward models: build, read, score
    "RewardEnsemble": "hfrlhf.models.reward_head", "reward_model_from_causal_lm": "hfrlhf.models.reward_head",
    "sequence_rewards": "hfrlhf.models.reward_head",
    "score_completions": "hfrlhf.models.reward_head",
    # PPO: policy + critic, rollouts, reward functions
    "ActorCritic": "hfrlhf.models.value", "ValueHead": "hfrlhf.models.value", "build_critic": "hfrlhf.models.value",
    "Rollout": "hfrlhf.ops.rollout", "Responses": "hfrlhf.ops.rollout", "RolloutCollator": "hfrlhf.ops.rollout",
    "RewardScorer": "hfrlhf.ops.rollout", "RewardFn": "hfrlhf.ops.rollout",
    "get_reward_fn": "hfrlhf.workflows.rewards", "vader_sentiment": "hfrlhf.workflows.rewards",
    # losses
    "get_loss": "hfrlhf.losses", "available_losses": "hfrlhf.losses", "register_loss": "hfrlhf.losses",
    "LossOutput": "hfrlhf.losses", "PairLogps": "hfrlhf.losses", "ListLogps": "hfrlhf.losses",
    # publishing and plots
    "ModelCard": "hfrlhf.hub", "push_to_hub": "hfrlhf.hub",
    "plot_log_history": "hfrlhf.plotting",
}
_RENAMES = {"load_dataset": "load"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hfrlhf' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return getattr(module, _RENAMES.get(name, name))


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__version__"})
