"""Models: loading (LoRA, 4-bit, the bundled offline model), reward heads, and the PPO policy + critic.

Names are imported on first use, so ``import hfrlhf.models`` loads neither peft nor bitsandbytes.

>>> from hfrlhf.models import score_completions, load_bundled  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelArguments": "loading", "load_bundled": "loading", "load_causal_lm": "loading",
    "load_reward_model": "loading", "load_tokenizer": "loading", "get_peft_config": "loading",
    "get_quantization_config": "loading", "bf16_supported": "loading", "score_head": "loading",
    "RewardEnsemble": "reward_head", "reward_model_from_causal_lm": "reward_head",
    "score_completions": "reward_head",
    "sequence_rewards": "reward_head", "keep_4bit_weights_trainable": "quantized",
    "ActorCritic": "value", "PolicyValueOutput": "value", "ValueHead": "value", "build_critic": "value",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hfrlhf.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hfrlhf.models.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
