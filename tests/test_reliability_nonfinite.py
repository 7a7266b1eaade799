"""Non-finite losses and gradients: detected, and either skipped (warning + logged counter) or raised naming the
step, per ``nonfinite_loss``."""

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import PrinterCallback, TrainerCallback

from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.trainers.ppo import PPOConfig, PPOTrainer

PAIRS = [{"prompt": f"Count {w}", "chosen": f" {w} {w}", "rejected": " no"}
         for w in ["one", "two", "three", "four", "five", "six"]]


class Snapshots(TrainerCallback):
    """The parameters after every optimizer step, keyed by global step (0 = before training)."""

    def __init__(self):
        self.params = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.params[0] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.params[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def _dpo(tmp_path, tok, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", per_device_train_batch_size=2,
                bf16=False, max_steps=3, logging_steps=1, disable_tqdm=True, seed=0, max_length=32, learning_rate=1e-2)
    base.update(kw)
    model = build_tiny_llama(tok, seed=1)
    snaps = Snapshots()
    trainer = DPOTrainer(model, args=DPOConfig(**base), train_dataset=Dataset.from_list(PAIRS), processing_class=tok,
                         callbacks=[snaps])
    trainer.remove_callback(PrinterCallback)
    return trainer, snaps


def _poison_forward_at_step(trainer, step):
    """Make the policy's hidden states NaN during global step ``step`` (0-based), so that step's loss is NaN."""
    layer = trainer.model.model.layers[0]

    def hook(module, args, output):
        if trainer.state.global_step == step and module.training:
            hidden = output[0] if isinstance(output, tuple) else output
            poisoned = hidden * float("nan")
            return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned
        return output

    return layer.register_forward_hook(hook)


def _poison_gradient_at_step(trainer, step):
    """Make one weight's gradient NaN during global step ``step`` while the loss stays finite."""
    weight = trainer.model.model.norm.weight
    return weight.register_hook(lambda g: g * float("nan") if trainer.state.global_step == step else g)


def test_nonfinite_loss_skip_warns_counts_and_drops_that_micro_batch(tmp_path, tok):
    # plain SGD without momentum or weight decay: a skipped micro-batch (zero gradient) leaves parameters unchanged
    trainer, snaps = _dpo(tmp_path, tok, optim="sgd", weight_decay=0.0)
    _poison_forward_at_step(trainer, 1)
    with pytest.warns(RuntimeWarning, match="non-finite loss at global step 1: batch skipped"):
        trainer.train()
    assert trainer.nonfinite_skipped == 1
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert "nonfinite_skipped" not in logs[1] and logs[2]["nonfinite_skipped"] == 1.0
    assert not _same(snaps.params[0], snaps.params[1])
    assert _same(snaps.params[1], snaps.params[2])  # the NaN step moved nothing
    assert not _same(snaps.params[2], snaps.params[3])  # and training went on
    assert all(torch.isfinite(p).all() for p in snaps.params[3].values())


def test_a_step_whose_only_micro_batch_is_skipped_leaves_adamw_parameters_untouched(tmp_path, tok):
    # a zero gradient would still move AdamW parameters (momentum, weight decay): the step itself is skipped
    trainer, snaps = _dpo(tmp_path, tok, weight_decay=0.1)
    _poison_forward_at_step(trainer, 1)
    with pytest.warns(RuntimeWarning, match="non-finite loss at global step 1"):
        trainer.train()
    assert _same(snaps.params[1], snaps.params[2]) and not _same(snaps.params[2], snaps.params[3])
    assert trainer.nonfinite_skipped == 1 and trainer.nonfinite_grad_skipped == 0


def test_with_accumulation_only_the_skipped_micro_batch_is_left_out(tmp_path, tok):
    # SGD, two micro-batches of one pair; the second micro-batch of step 0 is NaN. The step then applies the
    # first micro-batch's gradient divided by 2 (the loss is a mean over the accumulation steps).
    trainer, snaps = _dpo(tmp_path, tok, optim="sgd", weight_decay=0.0, per_device_train_batch_size=1,
                          gradient_accumulation_steps=2, max_steps=1, learning_rate=0.5, max_grad_norm=0.0)
    layer, calls = trainer.model.model.layers[0], []

    def hook(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) > 1:  # the policy forward of the second micro-batch
                hidden = output[0] if isinstance(output, tuple) else output
                return (hidden * float("nan"), *output[1:]) if isinstance(output, tuple) else hidden * float("nan")
        return output

    layer.register_forward_hook(hook)
    first_rows = []
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: first_rows.append(rows) or collate(rows)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        trainer.train()
    assert trainer.nonfinite_skipped == 1 and len(first_rows) >= 2  # (the loader may prefetch the next batch)
    # expected: one SGD step on half the first micro-batch's loss, from a fresh copy of the same model
    model = build_tiny_llama(tok, seed=1)
    model.train()
    ref_trainer, _ = _dpo(tmp_path / "ref", tok)
    batch = collate(first_rows[0])
    loss = ref_trainer.compute_loss(model, batch) / 2
    loss.backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            expected = p - 0.5 * (p.grad if p.grad is not None else 0)
            torch.testing.assert_close(snaps.params[1][name], expected, atol=1e-6, rtol=1e-5)


def test_nonfinite_loss_raise_names_the_step_and_saves_the_batch(tmp_path, tok):
    trainer, snaps = _dpo(tmp_path, tok, nonfinite_loss="raise")
    _poison_forward_at_step(trainer, 1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at global step 1") as info:
        trainer.train()
    path = str(info.value).rsplit("saved to ", 1)[1]
    batch = load_file(path)
    # the saved micro-batch is the one the collator built for step 1: two pairs, chosen then rejected
    assert batch["input_ids"].shape[0] == 4 and batch["last_index"].shape == (4,)
    assert trainer.state.global_step == 1 and _same(snaps.params[1], dict(trainer.model.named_parameters()))


def test_nonfinite_gradient_skip_leaves_parameters_and_optimizer_state_untouched(tmp_path, tok):
    trainer, snaps = _dpo(tmp_path, tok)  # AdamW: a zero gradient would still move parameters through momentum
    _poison_gradient_at_step(trainer, 1)
    with pytest.warns(RuntimeWarning, match="non-finite gradient at global step 1: optimizer step skipped"):
        trainer.train()
    assert trainer.nonfinite_skipped == 0 and trainer.nonfinite_grad_skipped == 1
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert all(h["loss"] == h["loss"] for h in logs.values())  # the loss itself was finite throughout
    assert "nonfinite_grad_skipped" not in logs[1] and logs[2]["nonfinite_grad_skipped"] == 1.0
    assert not _same(snaps.params[0], snaps.params[1])
    assert _same(snaps.params[1], snaps.params[2])
    assert not _same(snaps.params[2], snaps.params[3])
    assert all(torch.isfinite(p).all() for p in snaps.params[3].values())


def test_nonfinite_gradient_raise_names_the_step(tmp_path, tok):
    trainer, snaps = _dpo(tmp_path, tok, nonfinite_loss="raise")
    _poison_gradient_at_step(trainer, 2)
    with pytest.raises(FloatingPointError, match="non-finite gradient before the optimizer step of global step 2"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert _same(snaps.params[2], dict(trainer.model.named_parameters()))  # nothing NaN reached the weights


def test_gradient_accumulation_skips_the_whole_step_when_one_micro_batch_has_nan_gradients(tmp_path, tok):
    trainer, snaps = _dpo(tmp_path, tok, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    _poison_gradient_at_step(trainer, 0)
    with pytest.warns(RuntimeWarning, match="non-finite gradient at global step 0"):
        trainer.train()
    assert trainer.nonfinite_grad_skipped == 1
    assert _same(snaps.params[0], snaps.params[1]) and not _same(snaps.params[1], snaps.params[2])


def test_ppo_nonfinite_gradients_are_skipped_in_its_own_update_loop(tmp_path, tok):
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), report_to=[], save_strategy="no", per_device_train_batch_size=4,
                     max_steps=2, logging_steps=1, disable_tqdm=True, seed=0, response_length=4, num_ppo_epochs=1,
                     num_mini_batches=2, num_sample_generations=0, learning_rate=1e-2)
    prompts = [{"prompt": p} for p in ["Hi", "Hello there", "The quick", "one two"]]
    trainer = PPOTrainer(args, tok, build_tiny_llama(tok, seed=1), reward_model=lambda p, c: [len(x) / 5 for x in c],
                         train_dataset=prompts)
    trainer.remove_callback(PrinterCallback)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: g * float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        trainer.train()
    # two rollouts x two mini-batches: every optimizer step was skipped, no parameter moved
    assert trainer.nonfinite_grad_skipped == 4
    assert _same(before, dict(trainer.model.named_parameters()))
    assert any(h.get("nonfinite_grad_skipped") == 4.0 for h in trainer.state.log_history)


def test_unknown_nonfinite_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nonfinite_loss must be 'skip' or 'raise'"):
        DPOConfig(output_dir=str(tmp_path), report_to=[], nonfinite_loss="ignore")
