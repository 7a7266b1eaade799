"""The trainers: ``transformers.Trainer`` subclasses, imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DPOConfig": "dpo", "DPOTrainer": "dpo",
    "RewardConfig": "reward", "RewardTrainer": "reward", "compute_accuracy": "reward",
    "KTOConfig": "kto", "KTOTrainer": "kto", "KTOCollator": "kto", "add_kl_partners": "kto",
    "PPOConfig": "ppo", "PPOTrainer": "ppo",
    "SFTConfig": "sft", "SFTTrainer": "sft",
    "HfrlhfConfig": "base", "HfrlhfTrainer": "base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hfrlhf.trainers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hfrlhf.trainers.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
