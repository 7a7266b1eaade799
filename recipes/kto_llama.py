"""KTO: align a Llama-family chat model with answers labelled desirable or undesirable.

Thumbs-up / thumbs-down data needs no pairs; with no ``--dataset_name`` the shipped preference pairs are
unpaired (chosen -> desirable, rejected -> undesirable).

Offline on CPU, the bundled SmolLM2-135M-Instruct with LoRA on the data shipped with hfrlhf:

    python recipes/kto_llama.py --config recipes/configs/kto_llama.yaml

On GPUs with accelerate (one process per GPU; pick a launch config in recipes/accelerate/):

    accelerate launch recipes/kto_llama.py --config recipes/configs/kto_llama.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/kto_llama.py --config recipes/configs/kto_llama.yaml \
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --dataset_name trl-lib/kto-mix-14k

4-bit QLoRA of a bigger Llama on one GPU:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/kto_llama.py \
        --config recipes/configs/kto_llama.yaml --model_name_or_path meta-llama/Llama-3.1-8B-Instruct \
        --load_in_4bit --torch_dtype bfloat16 --dataset_name trl-lib/kto-mix-14k

Any flag overrides the YAML (``--beta 0.2 --desirable_weight 1.33``); ``--push_to_hub --hub_model_id you/name``
pushes the adapter with a model card; ``--merge_adapter`` also saves a merged full model. The installed
command runs the same code: ``hfrlhf kto --config recipes/configs/kto_llama.yaml``.
"""

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.kto import KTOConfig
from hfrlhf.workflows.args import ScriptArguments, parse_args
from hfrlhf.workflows.kto import run

if __name__ == "__main__":
    script_args, training_args, model_args = parse_args((ScriptArguments, KTOConfig, ModelArguments))
    run(script_args, training_args, model_args)
