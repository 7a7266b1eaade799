"""PPO workflow (stage 3): prompts -> samples scored by a reward model or a reward function -> a better policy.

The reward is a reward model (``--reward_model_path``: a folder the reward recipe wrote, LoRA adapter or
full model, or a Hub id) or a named function (``--reward_fn vader``: VADER sentiment, offline; or
``package.module:function``). With LoRA one base model serves as policy, reference (adapters off) and
critic (its own adapter and value head). ``recipes/ppo_llama.py`` and ``hfrlhf ppo`` both parse
:data:`ARGUMENTS` and call :func:`run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from hfrlhf.models.loading import ModelArguments, load_reward_model, load_tokenizer
from hfrlhf.trainers.ppo import PPOConfig, PPOTrainer
from hfrlhf.workflows import steps
from hfrlhf.workflows.args import ScriptArguments
from hfrlhf.workflows.data import describe_source, load_splits, rows_named_in_source
from hfrlhf.workflows.rewards import get_reward_fn

__all__ = ["ARGUMENTS", "PPOScriptArguments", "load_reward", "run"]


@dataclass
class PPOScriptArguments(ScriptArguments):
    """:class:`ScriptArguments` plus where PPO's reward comes from."""

    reward_model_path: str | None = field(
        default=None,
        metadata={"help": "Reward model: an output folder of the reward recipe (LoRA adapter or full model), any "
                          "sequence-classifier folder or Hub id. Takes precedence over reward_fn."},
    )
    reward_fn: str | None = field(
        default="vader",
        metadata={"help": "Reward function when there is no reward model: 'vader' (sentiment of the completion, "
                          "offline) or 'package.module:function' taking (prompts, completions) -> scores."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_model_path and not self.reward_fn:
            raise ValueError("PPO needs a reward: set reward_model_path or reward_fn")


ARGUMENTS = (PPOScriptArguments, PPOConfig, ModelArguments)


def load_reward(path: str, model_args: ModelArguments) -> tuple[Any, Any]:
    """A frozen reward model and its tokenizer from ``path``; a LoRA adapter folder is merged into its base."""
    plain = dataclasses.replace(model_args, model_name_or_path=path, use_peft=False, load_in_4bit=False,
                                load_in_8bit=False)
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        return load_reward_model(plain), load_tokenizer(path, trust_remote_code=model_args.trust_remote_code)
    from peft import PeftModel

    with open(adapter_config, encoding="utf-8") as f:
        base = json.load(f)["base_model_name_or_path"]
    model = load_reward_model(dataclasses.replace(plain, model_name_or_path=base))
    model = PeftModel.from_pretrained(model, path).merge_and_unload()  # the score head comes with the adapter
    return model, load_tokenizer(path, trust_remote_code=model_args.trust_remote_code)


def run(script_args: PPOScriptArguments, training_args: PPOConfig, model_args: ModelArguments) -> steps.RunResult:
    """Train with PPO, save the policy (and critic), evaluate, plot, merge and push."""
    started = time.time()
    hub = steps.prepare(training_args)

    # 1. policy, tokenizer and LoRA config (the critic is a second adapter on the same base)
    model, tokenizer, peft_config = steps.load_policy(model_args)

    # 2. the reward: a reward model, or a function of (prompts, completions)
    if script_args.reward_model_path:
        reward, reward_tokenizer = load_reward(script_args.reward_model_path, model_args)
    else:
        reward, reward_tokenizer = get_reward_fn(script_args.reward_fn), None

    # 3. data: prompts only (pairs and SFT records give their prompts)
    train_data, eval_data = load_splits(script_args, kind="prompt", seed=training_args.seed,
                                        drop_invalid=training_args.drop_invalid_rows)

    # 4. the trainer (TRL's argument order: args, tokenizer, model, ref_model, reward_model, data)
    with rows_named_in_source(script_args, {"train_dataset": train_data, "eval_dataset": eval_data}):
        trainer = PPOTrainer(
            args=training_args,
            processing_class=tokenizer,
            model=model,
            reward_model=reward,
            train_dataset=train_data,
            eval_dataset=eval_data,
            peft_config=peft_config,
            reward_processing_class=reward_tokenizer,
        )

    # 5. held-out scores before, training, then save / evaluate / plot / merge / push
    before = steps.evaluate_before(trainer, script_args)
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return steps.finish(trainer, "ppo", script_args, training_args, model_args, hub=hub, metrics_before=before,
                        train_output=output, data_name=describe_source(script_args), started=started)
