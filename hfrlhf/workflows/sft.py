"""SFT workflow (stage 1): prompt + completion demonstrations (or plain ``text``) -> a model that answers like them.

With no data given it trains on the chosen answers of the preference pairs shipped with hfrlhf.
``recipes/sft_llama.py`` and ``hfrlhf sft`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.sft import SFTConfig, SFTTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, SFTConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelArguments) -> steps.RunResult:
    """Supervised fine-tuning with a completion-only loss; save, evaluate, plot, merge and push."""
    # prompt + completion records (pairs give their chosen answer, chat transcripts their last turn), or
    # language-modeling text rows, trained on whole
    return steps.train_and_finish("sft", SFTTrainer, script_args, training_args, model_args,
                                  data_kind=("sft", "text"))
