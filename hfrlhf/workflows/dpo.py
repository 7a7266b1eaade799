"""DPO workflow: preference pairs (or ranked lists) -> a policy that prefers the chosen answers.

``recipes/dpo_llama.py`` and ``hfrlhf dpo`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

import time

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments
from hfrlhf.workflows.data import describe_source, load_splits

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, DPOConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train with DPO (or any ``loss_type`` of its family), save, evaluate, plot, merge and push."""
    started = time.time()
    hub = steps.prepare(training_args)

    # 1. model, tokenizer and LoRA config; with LoRA the reference is the policy with its adapter off
    model, tokenizer, peft_config = steps.load_policy(model_args)

    # 2. data: pairs, or ranked lists for the listwise losses (lipo, pro, rrhf)
    kind = "listwise" if training_args.is_listwise else "pairwise"
    train_data, eval_data = load_splits(script_args, kind=kind, seed=training_args.seed)

    # 3. the trainer
    trainer = DPOTrainer(
        model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    # 4. held-out metrics before, training, then save / evaluate / plot / merge / push
    before = steps.evaluate_before(trainer, script_args)
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return steps.finish(trainer, "dpo", script_args, training_args, model_args, hub=hub, metrics_before=before,
                        train_output=output, data_name=describe_source(script_args), started=started)
