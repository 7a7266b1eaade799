"""SFT workflow (stage 1): prompt + completion demonstrations -> a model that answers like them.

With no data given it trains on the chosen answers of the preference pairs shipped with hfrlhf.
``recipes/sft_llama.py`` and ``hfrlhf sft`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

import time

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.sft import SFTConfig, SFTTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments
from hfrlhf.workflows.data import describe_source, load_splits

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, SFTConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelArguments) -> steps.RunResult:
    """Supervised fine-tuning with a completion-only loss; save, evaluate, plot, merge and push."""
    started = time.time()
    hub = steps.prepare(training_args)

    # 1. model, tokenizer and LoRA config
    model, tokenizer, peft_config = steps.load_policy(model_args)

    # 2. data: prompt + completion records (pairs give their chosen answer, chat transcripts their last turn)
    train_data, eval_data = load_splits(script_args, kind="sft", seed=training_args.seed)

    # 3. the trainer
    trainer = SFTTrainer(
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
    return steps.finish(trainer, "sft", script_args, training_args, model_args, hub=hub, metrics_before=before,
                        train_output=output, data_name=describe_source(script_args), started=started)
