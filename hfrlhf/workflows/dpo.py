"""DPO workflow: preference pairs (or ranked lists) -> a policy that prefers the chosen answers.

``recipes/dpo_llama.py`` and ``hfrlhf dpo`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, DPOConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train with DPO (or any ``loss_type`` of its family), save, evaluate, plot, merge and push."""
    # pairs, or ranked lists for the listwise losses (lipo, pro, rrhf)
    return steps.train_and_finish("dpo", DPOTrainer, script_args, training_args, model_args,
                                  data_kind="listwise" if training_args.is_listwise else "pairwise")
