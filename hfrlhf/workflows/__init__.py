"""The runnable workflows behind ``recipes/*.py`` and the ``hfrlhf`` command, one module per method.

Each module holds ``ARGUMENTS`` (its ``(ScriptArguments, <Config>, ModelArguments)`` dataclasses) and
``run(script_args, training_args, model_args)``, which loads the model and data, trains, saves, evaluates,
plots, and optionally merges and pushes. A recipe is those two lines; ``hfrlhf <method>`` runs the same.

>>> sorted(METHODS)
['dpo', 'kto', 'ppo', 'reward', 'sft']
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["METHODS", "get_workflow"]

METHODS: dict[str, str] = {
    "sft": "stage 1: supervised fine-tuning on demonstrations (completion-only loss)",
    "reward": "stage 2: a reward model from preference pairs or rankings",
    "ppo": "stage 3: PPO against a reward model or a reward function, with a KL leash",
    "dpo": "direct: DPO and its family on preference pairs or ranked lists",
    "kto": "direct: KTO on completions labelled desirable / undesirable",
}


def get_workflow(method: str) -> ModuleType:
    """The workflow module of ``method`` (``"dpo"``...), with ``ARGUMENTS`` and ``run``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"hfrlhf.workflows.{method}")
