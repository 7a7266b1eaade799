"""DPO: align a Llama-family chat model with preference pairs (chosen vs rejected answers).

Offline on CPU, the bundled SmolLM2-135M-Instruct with LoRA on the pairs shipped with hfrlhf:

    python recipes/dpo_llama.py --config recipes/configs/dpo_llama.yaml

The short demo (under 2 minutes on 2 idle cores of a CPU with bf16 units; prints held-out reward accuracy
before vs after):

    python recipes/dpo_llama.py --config recipes/configs/demo_dpo.yaml

On GPUs with accelerate (one process per GPU; pick a launch config in recipes/accelerate/):

    accelerate launch recipes/dpo_llama.py --config recipes/configs/dpo_llama.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/dpo_llama.py --config recipes/configs/dpo_llama.yaml \
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --dataset_name trl-lib/ultrafeedback_binarized

4-bit QLoRA of a bigger Llama, one process per GPU (one GPU: recipes/accelerate/single_gpu.yaml):

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/dpo_llama.py --config recipes/configs/dpo_llama_qlora.yaml \
        --model_name_or_path meta-llama/Llama-3.1-8B-Instruct --push_to_hub --hub_model_id you/llama-dpo-qlora

Any flag overrides the YAML (``--beta 0.05 --loss_type ipo``); ``--push_to_hub --hub_model_id you/name``
pushes the adapter with a model card; ``--merge_adapter`` also saves a merged full model. The installed
command runs the same code: ``hfrlhf dpo --config recipes/configs/dpo_llama.yaml``.
"""

from hfrlhf.models.loading import ModelArguments
from hfrlhf.trainers.dpo import DPOConfig
from hfrlhf.workflows.args import ScriptArguments, parse_args
from hfrlhf.workflows.dpo import run

if __name__ == "__main__":
    script_args, training_args, model_args = parse_args((ScriptArguments, DPOConfig, ModelArguments))
    run(script_args, training_args, model_args)
