"""Reward-model workflow (stage 2): preference pairs (or rankings, or scored answers) -> a scalar reward model.

The model is a one-output sequence classifier built from the causal LM (a new score head); with LoRA the
head is trained and saved with the adapter, so the output folder is a complete reward model that
``recipes/ppo_llama.py --reward_model_path <output_dir>`` can use. ``recipes/reward_llama.py`` and
``hfrlhf reward`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.reward import RewardConfig, RewardTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, RewardConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: RewardConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train a reward model, save, evaluate (accuracy and margin on held-out pairs), plot, merge and push."""
    # pairs (bradley_terry), rankings (plackett_luce, all_pairs) or scored answers (mse), as the loss takes
    return steps.train_and_finish("reward", RewardTrainer, script_args, training_args, model_args,
                                  data_kind=training_args.data_kind, reward_model=True)
