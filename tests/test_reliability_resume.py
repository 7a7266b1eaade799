"""Interrupt and resume: runs killed with SIGKILL mid-training continue from their last complete checkpoint and
end with the parameters of an uninterrupted run; a partially written checkpoint is never picked up."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import PrinterCallback

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.base import checkpoint_is_complete, last_complete_checkpoint
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer

# The training script run in a subprocess: a tiny model, a checkpoint every 2 steps, the final parameters saved
# as safetensors. argv: kind (dpo|ppo), output_dir, resume (0|1), seconds to wait after each step.
SCRIPT = r'''
import sys, time
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

kind, out, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
torch.set_num_threads(1)
tok = build_tiny_tokenizer()
common = dict(output_dir=out, report_to=[], save_strategy="steps", save_steps=2, max_steps=8, logging_steps=1,
              disable_tqdm=True, seed=3, learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2)


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(delay)


if kind == "dpo":
    from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = [{"prompt": f"Count {w}", "chosen": f" {w} {words[(i + 1) % 10]}", "rejected": " no"}
            for i, w in enumerate(words)] * 2
    args = DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=32, **common)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=rows, processing_class=tok,
                         callbacks=[Slow()])
else:
    from hfrlhf.trainers.ppo import PPOConfig, PPOTrainer
    prompts = [{"prompt": p} for p in ["Hi", "Hello there", "The quick", "one two", "What is", "I really"]] * 2
    args = PPOConfig(per_device_train_batch_size=4, response_length=5, num_ppo_epochs=2, num_mini_batches=2,
                     kl_coef=0.05, adaptive_kl=True, kl_target=0.01, kl_horizon=100, normalize_rewards=True,
                     num_sample_generations=0, **common)
    trainer = PPOTrainer(args, tok, build_tiny_llama(tok, seed=1),
                         reward_model=lambda prompts, completions: [len(c) / 10 for c in completions],
                         train_dataset=prompts, callbacks=[Slow()])
trainer.train(resume_from_checkpoint=True if resume else None)
save_file({k: v.detach().contiguous() for k, v in trainer.model.named_parameters()}, out + "/final.safetensors")
'''


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _run(script, kind, out, resume):
    proc = subprocess.run([sys.executable, str(script), kind, str(out), "1" if resume else "0", "0"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "final.safetensors"))


def _kill_after_checkpoint(script, kind, out, min_step):
    """Start a slowed-down run, SIGKILL it as soon as a complete checkpoint at step >= ``min_step`` exists."""
    proc = subprocess.Popen([sys.executable, str(script), kind, str(out), "0", "0.5"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            last = last_complete_checkpoint(out) if out.is_dir() else None
            if last is not None and int(last.rsplit("-", 1)[1]) >= min_step:
                break
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared in time")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "final.safetensors").exists()  # killed mid-training, not after it
    return last


@pytest.mark.slow  # three training subprocesses: tens of seconds
@pytest.mark.parametrize("kind", ["dpo", "ppo"])
def test_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, kind):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    straight = _run(script, kind, tmp_path / "straight", resume=False)

    out = tmp_path / "killed"
    last = _kill_after_checkpoint(script, kind, out, min_step=2)
    step = int(last.rsplit("-", 1)[1])
    assert step < 8
    # a folder cut short while saving, numbered after every real checkpoint: resuming must not pick it
    partial = out / "checkpoint-7"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 16)
    (partial / "trainer_state.json").write_text('{"global_step": 7, "log_hist')
    assert last_complete_checkpoint(out) == last

    resumed = _run(script, kind, out, resume=True)
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # the runs trained: the policy's final parameters are not its initial ones
    init = {n: p.detach() for n, p in build_tiny_llama(build_tiny_tokenizer(), seed=1).named_parameters()}
    pairs = [(key, n) for key in straight for n in init if key == n or key.endswith("." + n)]
    assert pairs and any(not torch.equal(straight[key], init[n]) for key, n in pairs)


# --- partial checkpoints, in process -----------------------------------------------------------------------------
PAIRS = [{"prompt": f"Count {w}", "chosen": f" {w}", "rejected": " no"} for w in ["one", "two", "three", "four"]]


def _trainer(tmp_path, tok, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], per_device_train_batch_size=2, max_steps=2,
                save_strategy="steps", save_steps=1, logging_steps=1, disable_tqdm=True, seed=0, max_length=32)
    base.update(kw)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=DPOConfig(**base),
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _fabricate_partial(folder, step, state_text=None):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"not a complete file")
    if state_text is not None:
        (path / "trainer_state.json").write_text(state_text)
    return path


def test_completeness_is_judged_by_the_state_file_written_last(tmp_path, tok):
    trainer = _trainer(tmp_path, tok)
    trainer.train()
    out = tmp_path / "out"
    assert checkpoint_is_complete(out / "checkpoint-2") and checkpoint_is_complete(out / "checkpoint-1")
    no_state = _fabricate_partial(out, 3)
    cut_state = _fabricate_partial(out, 4, '{"global_step": 4, "log_history": [{"lo')
    assert not checkpoint_is_complete(no_state) and not checkpoint_is_complete(cut_state)
    assert not checkpoint_is_complete(out / "checkpoint-99")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_resume_true_skips_partial_checkpoints_and_explicit_partial_path_is_refused(tmp_path, tok, caplog):
    first = _trainer(tmp_path, tok, max_steps=1)
    first.train()
    out = tmp_path / "out"
    partial = _fabricate_partial(out, 5, '{"glo')
    # transformers alone would take the highest number, partial or not
    from transformers.trainer_utils import get_last_checkpoint
    assert get_last_checkpoint(str(out)) == str(partial)

    second = _trainer(tmp_path, tok, max_steps=2)
    with caplog.at_level("WARNING", logger="hfrlhf.trainers.base"):
        second.train(resume_from_checkpoint=True)
    assert "incomplete checkpoint" in caplog.text and "checkpoint-5" in caplog.text
    assert second.state.global_step == 2
    # the history of step 1 comes from checkpoint-1: the run continued it rather than starting again
    losses = [(h["step"], h["loss"]) for h in second.state.log_history if "loss" in h]
    assert [s for s, _ in losses] == [1, 2]
    assert losses[0][1] == next(h["loss"] for h in first.state.log_history if "loss" in h)

    third = _trainer(tmp_path, tok, max_steps=6)
    with pytest.raises(ValueError, match="checkpoint-5 is incomplete"):
        third.train(resume_from_checkpoint=str(partial))


def test_resume_true_without_any_complete_checkpoint_is_a_clear_error(tmp_path, tok):
    _fabricate_partial(tmp_path / "out", 3)
    with pytest.raises(ValueError, match="no complete checkpoint found"):
        _trainer(tmp_path, tok).train(resume_from_checkpoint=True)
