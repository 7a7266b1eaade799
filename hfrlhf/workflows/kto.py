"""KTO workflow: completions labelled desirable / undesirable -> a policy that produces the desirable kind.

With no data given it trains on the shipped preference pairs, unpaired (chosen -> desirable, rejected ->
undesirable). ``recipes/kto_llama.py`` and ``hfrlhf kto`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.kto import KTOConfig, KTOTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, KTOConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: KTOConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train with KTO, save, evaluate, plot, merge and push."""
    # unpaired rows; the held-out rows are chosen before pairs are split, so no prompt is on both sides
    return steps.train_and_finish("kto", KTOTrainer, script_args, training_args, model_args,
                                  data_kind="unpaired")
