"""Two processes (torchrun, gloo on CPU) with non-finite values on one process only: the configs' CPU default
joins both processes in one group, and both take the same decisions, so their parameters stay identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# No use_cpu in the config: without a GPU the config sets it, which torchrun processes need to join one group.
SCRIPT = r'''
import json, sys
import torch
from safetensors.torch import save_file
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer

out = sys.argv[1]
tok = build_tiny_tokenizer()
rows = [{"prompt": f"Count {w}", "chosen": f" {w} {w}", "rejected": " no"}
        for w in ["one", "two", "three", "four", "five", "six", "seven", "eight"]]
args = DPOConfig(output_dir=out, report_to=[], save_strategy="no", per_device_train_batch_size=2, max_steps=4,
                 logging_steps=1, disable_tqdm=True, seed=0, max_length=32, learning_rate=1e-2)
trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=rows, processing_class=tok)
rank = args.process_index


def nan_forward(module, inputs, output):  # rank 0, step 1: a NaN loss on this process only
    if rank == 0 and trainer.state.global_step == 1 and module.training:
        return (output[0] * float("nan"), *output[1:]) if isinstance(output, tuple) else output * float("nan")
    return output


trainer.model.model.layers[0].register_forward_hook(nan_forward)
# rank 1, step 2: a NaN gradient on this process only (the all-reduce spreads it)
trainer.model.model.norm.weight.register_hook(
    lambda g: g * float("nan") if rank == 1 and trainer.state.global_step == 2 else g)
trainer.train()
save_file({k: v.detach().contiguous() for k, v in trainer.model.named_parameters()}, f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"world": args.world_size, "use_cpu": args.use_cpu, "loss_skips": trainer.nonfinite_skipped,
               "grad_skips": trainer.nonfinite_grad_skipped, "step": trainer.state.global_step}, f)
trainer.end_training()  # frees the DDP wrapper, then destroys the process group
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default is what is tested")
def test_nonfinite_on_one_process_keeps_both_in_step(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "out")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world"] == 2 and i["use_cpu"] and i["step"] == 4 for i in info)  # one group of two
    assert [i["loss_skips"] for i in info] == [1, 0]
    assert [i["grad_skips"] for i in info] == [1, 1]  # both processes saw the reduced NaN gradient
    p0, p1 = (load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in (0, 1))
    for name, value in p0.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, p1[name]), name
