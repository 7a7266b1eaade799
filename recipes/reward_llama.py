"""Reward model (stage 2): learn a scalar score from human preferences (chosen vs rejected answers).

A one-output sequence classifier on top of a Llama-family model; with LoRA the score head is trained and
saved with the adapter, so the output folder is a reward model PPO can use:

    python recipes/ppo_llama.py --config recipes/configs/ppo_llama.yaml --reward_model_path outputs/reward-llama

With no ``--dataset_name`` it trains on the preference pairs shipped with hfrlhf.

Offline on CPU, the bundled SmolLM2-135M-Instruct with LoRA on the data shipped with hfrlhf:

    python recipes/reward_llama.py --config recipes/configs/reward_llama.yaml

On GPUs with accelerate (one process per GPU; pick a launch config in recipes/accelerate/):

    accelerate launch recipes/reward_llama.py --config recipes/configs/reward_llama.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/reward_llama.py --config recipes/configs/reward_llama.yaml \
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --dataset_name trl-lib/ultrafeedback_binarized

4-bit QLoRA of a bigger Llama on one GPU:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/reward_llama.py \
        --config recipes/configs/reward_llama.yaml --model_name_or_path meta-llama/Llama-3.1-8B-Instruct \
        --load_in_4bit --torch_dtype bfloat16 --dataset_name trl-lib/ultrafeedback_binarized

Any flag overrides the YAML (``--center_rewards_coefficient 0.01 --max_length 1024``);
``--push_to_hub --hub_model_id you/name`` pushes the adapter (score head included) with a model card; ``--merge_adapter`` also saves a merged full model. The installed
command runs the same code: ``hfrlhf reward --config recipes/configs/reward_llama.yaml``.
"""

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.reward import RewardConfig
from hfrlhf.workflows.args import ScriptArguments, parse_args
from hfrlhf.workflows.reward import run

if __name__ == "__main__":
    script_args, training_args, model_args = parse_args((ScriptArguments, RewardConfig, ModelArguments))
    run(script_args, training_args, model_args)
