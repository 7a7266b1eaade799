"""Reward-model workflow (stage 2): preference pairs (or rankings, or scored answers) -> a scalar reward model.

The model is a one-output sequence classifier built from the causal LM (a new score head); with LoRA the
head is trained and saved with the adapter, so the output folder is a complete reward model that
``recipes/ppo_llama.py --reward_model_path <output_dir>`` can use. ``recipes/reward_llama.py`` and
``hfrlhf reward`` both parse :data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

import time

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.reward import RewardConfig, RewardTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments
from hfrlhf.workflows.data import describe_source, load_splits

__all__ = ["ARGUMENTS", "run"]

ARGUMENTS = (ScriptArguments, RewardConfig, ModelArguments)


def run(script_args: ScriptArguments, training_args: RewardConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train a reward model, save, evaluate (accuracy and margin on held-out pairs), plot, merge and push."""
    started = time.time()
    hub = steps.prepare(training_args)

    # 1. a sequence classifier with one output, its tokenizer, and LoRA that also trains the score head
    model, tokenizer, peft_config = steps.load_reward(model_args)

    # 2. data of the kind the loss takes: pairs (bradley_terry), rankings (plackett_luce, all_pairs), scores (mse)
    train_data, eval_data = load_splits(script_args, kind=training_args.data_kind, seed=training_args.seed)

    # 3. the trainer
    trainer = RewardTrainer(
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
    return steps.finish(trainer, "reward", script_args, training_args, model_args, hub=hub, metrics_before=before,
                        train_output=output, data_name=describe_source(script_args), reward_model=True,
                        started=started)
