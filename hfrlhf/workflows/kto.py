"""KTO workflow: completions labelled desirable / undesirable -> a policy that produces the desirable kind.

With no data given it trains on the shipped preference pairs, unpaired (chosen -> desirable, rejected ->
undesirable). ``recipes/kto_llama.py`` and ``hfrlhf kto`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

import time

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.kto import KTOConfig, KTOTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments
from hfrlhf.workflows.data import describe_source, load_splits

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, KTOConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: KTOConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train with KTO, save, evaluate, plot, merge and push."""
    started = time.time()
    hub = steps.prepare(training_args)

    # 1. model, tokenizer and LoRA config; with LoRA the reference is the policy with its adapter off
    model, tokenizer, peft_config = steps.load_policy(model_args)

    # 2. data: unpaired rows; the held-out rows are chosen before pairs are split, so no prompt is on both sides
    train_data, eval_data = load_splits(script_args, kind="unpaired", seed=training_args.seed)

    # 3. the trainer
    trainer = KTOTrainer(
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
    return steps.finish(trainer, "kto", script_args, training_args, model_args, hub=hub, metrics_before=before,
                        train_output=output, data_name=describe_source(script_args), started=started)
