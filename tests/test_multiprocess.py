"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch.

The DPO recipe runs as 2 processes x 2 pairs and as 1 process x 4 pairs on the tiny model, from the same
seed, data order and LoRA initialisation; the logged losses and reward margins agree step by step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4

pytestmark = pytest.mark.multiprocess


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _flags(model_dir: Path, out: Path, batch: int) -> list[str]:
    return ["--config", str(ROOT / "recipes/configs/dpo_llama.yaml"), "--model_name_or_path", str(model_dir),
            "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
            "--warmup_steps", "0", "--logging_steps", "1", "--bf16", "false", "--report_to", "none",
            "--use_cpu", "true",  # without a GPU, torchrun processes join one gloo group only with use_cpu
            "--save_strategy", "no", "--eval_strategy", "no", "--eval_fraction", "0", "--disable_tqdm", "true",
            "--lora_r", "4", "--lora_alpha", "8", "--seed", "7", "--plot", "false"]


def _history(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model_dir = tmp_path / "tiny"
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recipe = str(ROOT / "recipes/dpo_llama.py")

    one = subprocess.run([sys.executable, recipe, *_flags(model_dir, tmp_path / "one", 4)], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          recipe, *_flags(model_dir, tmp_path / "two", 2)], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "== hfrlhf dpo: done" in two.stdout and two.stdout.count("== hfrlhf dpo: done") == 1  # main process only

    single, double = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [e["step"] for e in single] == [e["step"] for e in double] == list(range(1, STEPS + 1))
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), (a, b)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=2e-5)
        assert b["rewards/accuracies"] == pytest.approx(a["rewards/accuracies"], abs=1e-6)
    assert single[-1]["loss"] != pytest.approx(single[0]["loss"], abs=1e-4)  # training moved: several real steps
