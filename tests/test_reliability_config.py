"""Defaults of the shared config and trainer base that keep runs correct on any machine."""

import warnings

import pytest
import torch
from datasets import Dataset
from transformers import PrinterCallback

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.base import accelerator_available
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.trainers.kto import KTOConfig
from hfrlhf.trainers.ppo import PPOConfig
from hfrlhf.trainers.reward import RewardConfig

PAIRS = [{"prompt": f"Count {w}", "chosen": f" {w}", "rejected": " no"} for w in ["one", "two", "three", "four"]]
CONFIGS = [DPOConfig, KTOConfig, RewardConfig, PPOConfig]


@pytest.mark.skipif(accelerator_available(), reason="the CPU defaults apply only without a GPU")
@pytest.mark.parametrize("cls", CONFIGS)
def test_without_a_gpu_cpu_is_explicit_and_memory_is_not_pinned(tmp_path, cls):
    # whatever bf16 resolves to: torchrun processes only join one CPU process group with use_cpu
    for bf16 in (None, False):
        args = cls(output_dir=str(tmp_path), report_to=[], bf16=bf16)
        assert args.use_cpu is True and args.dataloader_pin_memory is False
        assert args.device.type == "cpu"
    explicit = cls(output_dir=str(tmp_path), report_to=[], dataloader_pin_memory=True)
    assert explicit.dataloader_pin_memory is False  # pinning only helps copies to a GPU


@pytest.mark.parametrize("cls", CONFIGS)
def test_gradient_checkpointing_option_gives_no_future_warning(tmp_path, cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        off = cls(output_dir=str(tmp_path), report_to=[])
        on = cls(output_dir=str(tmp_path), report_to=[], gradient_checkpointing=True)
        new_name = cls(output_dir=str(tmp_path), report_to=[], activation_checkpointing=True)
    assert off.gradient_checkpointing is False and off.activation_checkpointing is False
    assert on.gradient_checkpointing is True and on.activation_checkpointing is True
    assert new_name.gradient_checkpointing is True


def test_gradient_checkpointing_reaches_the_model_and_gives_the_same_step(tmp_path):
    tok = build_tiny_tokenizer()
    params = {}
    for flag in (False, True):
        args = DPOConfig(output_dir=str(tmp_path / str(flag)), report_to=[], save_strategy="no", max_steps=1,
                         per_device_train_batch_size=4, disable_tqdm=True, seed=0, max_length=32, bf16=False,
                         gradient_checkpointing=flag)
        trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tok)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        assert trainer.model.is_activation_checkpointing is flag
        params[flag] = {n: p.detach() for n, p in trainer.model.named_parameters()}
    for name, value in params[False].items():
        torch.testing.assert_close(params[True][name], value, atol=1e-6, rtol=1e-5)


def test_eval_log_keeps_compute_metrics_values_over_batch_averages(tmp_path):
    tok = build_tiny_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, max_length=32)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok)
    trainer.model.eval()
    for value in (0.0, 0.5):  # per-batch values stored during evaluation: average 0.25
        trainer.store_metrics({"rewards/accuracies": value, "rewards/margins": 2 * value})
    trainer.log({"eval_loss": 0.7, "eval_rewards/accuracies": 0.75})  # the exact value over the whole set
    last = trainer.state.log_history[-1]
    assert last["eval_rewards/accuracies"] == 0.75  # compute_metrics wins
    assert last["eval_rewards/margins"] == 0.5  # a stored metric without a computed value is still reported
    assert last["eval_loss"] == 0.7
    assert not trainer._metrics["eval"]  # cleared for the next evaluation
    # in training, stored metrics are the step's averages
    trainer.model.train()
    trainer.store_metrics({"rewards/accuracies": 1.0})
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["rewards/accuracies"] == 1.0


def test_eval_batch_metrics_are_weighted_by_batch_size(tmp_path):
    """An evaluation over 12 pairs in batches of 8 and 4: the reported accuracy is over the 12 pairs (8 right, 4
    wrong: 8/12), not the mean of the two batch accuracies (1/2), which over-weights the short last batch."""
    tok = build_tiny_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, max_length=32)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok)
    trainer.model.eval()
    trainer.store_metrics({"rewards/accuracies": 1.0}, weight=8)
    trainer.store_metrics({"rewards/accuracies": 0.0}, weight=4)
    trainer.log({"eval_loss": 0.7})
    assert trainer.state.log_history[-1]["eval_rewards/accuracies"] == pytest.approx(8 / 12)


def test_dpo_evaluation_accuracy_counts_every_pair_once(tmp_path):
    """Through the real evaluation loop: 5 pairs in batches of 2 (2, 2, 1) must report the accuracy over the 5
    pairs, the same as batches of 1 (where every batch is one pair, so no weighting can be wrong)."""
    tok = build_tiny_tokenizer()
    rows = Dataset.from_list((PAIRS * 2)[:5])
    accuracy = {}
    for batch in (2, 1):
        args = DPOConfig(output_dir=str(tmp_path / str(batch)), report_to=[], save_strategy="no", disable_tqdm=True,
                         max_length=32, per_device_eval_batch_size=batch, use_cpu=True)
        trainer = DPOTrainer(build_tiny_llama(tok, seed=3), ref_model=build_tiny_llama(tok, seed=4), args=args,
                             train_dataset=rows, eval_dataset=rows, processing_class=tok)
        accuracy[batch] = trainer.evaluate()["eval_rewards/accuracies"]
    assert 0 < accuracy[1] < 1  # a mix of right and wrong pairs, so a wrong weighting would show
    assert accuracy[2] == pytest.approx(accuracy[1])
