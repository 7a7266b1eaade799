"""SFT (stage 1): teach a Llama-family model to answer like the demonstrations.

The loss covers the completion tokens only (prompt tokens are masked); rows of plain ``text`` (TRL's
language-modeling data) are trained on whole, every token but the first. With no
``--dataset_name`` it trains on the chosen answers of the preference pairs shipped with hfrlhf.

Offline on CPU, the bundled SmolLM2-135M-Instruct with LoRA on the data shipped with hfrlhf:

    python recipes/sft_llama.py --config recipes/configs/sft_llama.yaml

On GPUs with accelerate (one process per GPU; pick a launch config in recipes/accelerate/):

    accelerate launch recipes/sft_llama.py --config recipes/configs/sft_llama.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/sft_llama.py --config recipes/configs/sft_llama.yaml \
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --dataset_name trl-lib/Capybara

4-bit QLoRA of a bigger Llama on one GPU:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/sft_llama.py \
        --config recipes/configs/sft_llama.yaml --model_name_or_path meta-llama/Llama-3.1-8B-Instruct \
        --load_in_4bit --torch_dtype bfloat16 --dataset_name trl-lib/Capybara

Any flag overrides the YAML (``--learning_rate 1e-4 --max_length 1024``); ``--push_to_hub --hub_model_id you/name``
pushes the adapter with a model card; ``--merge_adapter`` also saves a merged full model. The installed
command runs the same code: ``hfrlhf sft --config recipes/configs/sft_llama.yaml``.
"""

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.sft import SFTConfig
from hfrlhf.workflows.args import ScriptArguments, parse_args
from hfrlhf.workflows.sft import run

if __name__ == "__main__":
    script_args, training_args, model_args = parse_args((ScriptArguments, SFTConfig, ModelArguments))
    run(script_args, training_args, model_args)
