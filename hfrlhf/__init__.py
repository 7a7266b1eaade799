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
    # data
    "load_dataset": "hfrlhf.data.formats",
    "DataError": "hfrlhf.data.errors",
    "tokenize_dataset": "hfrlhf.data.tokenize",
    "PairwiseCollator": "hfrlhf.data.collators", "ListwiseCollator": "hfrlhf.data.collators",
    "UnpairedCollator": "hfrlhf.data.collators", "PointwiseCollator": "hfrlhf.data.collators",
    "PromptCollator": "hfrlhf.data.collators", "SFTCollator": "hfrlhf.data.collators",
    # models
    "ModelArguments": "hfrlhf.models.loading", "load_bundled": "hfrlhf.models.loading",
    "load_causal_lm": "hfrlhf.models.loading", "load_reward_model": "hfrlhf.models.loading",
    "load_tokenizer": "hfrlhf.models.loading",
    # losses
    "get_loss": "hfrlhf.losses", "available_losses": "hfrlhf.losses",
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
