"""PPO (stage 3): optimise a Llama-family chat model against a reward, with a KL leash to where it started.

The reward is a reward model (``--reward_model_path outputs/reward-llama``, e.g. what
``recipes/reward_llama.py`` wrote) or a reward function (``--reward_fn vader``: sentiment, offline; or
``package.module:function``). With no ``--dataset_name`` the prompts of the pairs shipped with hfrlhf are used.

Offline on CPU, the bundled SmolLM2-135M-Instruct with LoRA (policy, reference and critic share one base),
rewarded for positive sentiment:

    python recipes/ppo_llama.py --config recipes/configs/ppo_llama.yaml

On GPUs with accelerate (one process per GPU; pick a launch config in recipes/accelerate/):

    accelerate launch recipes/ppo_llama.py --config recipes/configs/ppo_llama.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/ppo_llama.py --config recipes/configs/ppo_llama.yaml \
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --reward_model_path outputs/reward-llama

4-bit QLoRA of a bigger Llama on one GPU:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/ppo_llama.py \
        --config recipes/configs/ppo_llama.yaml --model_name_or_path meta-llama/Llama-3.1-8B-Instruct \
        --load_in_4bit --torch_dtype bfloat16

Any flag overrides the YAML (``--kl_coef 0.1 --advantage_estimator rloo --num_generations 4``);
``--push_to_hub --hub_model_id you/name`` pushes the policy adapter with a model card; ``--merge_adapter``
also saves a merged full policy. The installed command runs the same code:
``hfrlhf ppo --config recipes/configs/ppo_llama.yaml``.
"""

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.ppo import PPOConfig
from hfrlhf.workflows.args import parse_args
from hfrlhf.workflows.ppo import PPOScriptArguments, run

if __name__ == "__main__":
    script_args, training_args, model_args = parse_args((PPOScriptArguments, PPOConfig, ModelArguments))
    run(script_args, training_args, model_args)
