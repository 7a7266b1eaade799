"""KTO in the packed and shared_prompt layouts: the KL half runs in its own forward without grad, and the loss,
metrics and gradients equal those of the padded layout (one sequence per row, the plain path)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from helpers import unpaired_chat as _chat
from peft import LoraConfig, get_peft_model

from hfrlhf.data.tokenize import tokenize_dataset
from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.trainers.kto import KTOConfig, KTOTrainer

# two prompts with two completions each (so shared_prompt has prompts to share) and two prompts alone
ROWS = [
    _chat("Review the film.", "I loved it, wonderful acting.", True),
    _chat("Review the film.", "Dull.", False),
    _chat("What is the capital of France?", "Paris, a lovely city.", True),
    _chat("What is the capital of France?", "Who cares about capitals anyway.", False),
    _chat("Count to three.", "one two three", True),
    _chat("Say something kind.", "I hated every minute of talking to you.", False),
]


@pytest.fixture(scope="module")
def data(tok):
    return tokenize_dataset(Dataset.from_list(ROWS), tok, max_length=64)


def _args(tmp_path, layout: str, precompute: bool) -> KTOConfig:
    return KTOConfig(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                     per_device_train_batch_size=len(ROWS), max_steps=1, disable_tqdm=True, seed=0, beta=0.7,
                     desirable_weight=1.2, undesirable_weight=0.9, layout=layout, precompute_ref_log_probs=precompute,
                     ref_cache_dir=str(tmp_path / f"cache-{layout}"))


def _policy(tok, lora: bool) -> torch.nn.Module:
    model = build_tiny_llama(tok, seed=1).double()
    if lora:  # a random adapter (not the identity), on every linear layer
        torch.manual_seed(3)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=False))
    return model


def _step(tmp_path, tok, data, policy, layout: str, precompute: bool, lora: bool):
    """Loss, metrics and gradients of one batch of every row."""
    ref = None if lora else build_tiny_llama(tok, seed=2).double()  # LoRA: the adapter-off policy
    trainer = KTOTrainer(copy.deepcopy(policy), ref_model=ref, args=_args(tmp_path, layout, precompute),
                         train_dataset=data, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return batch, loss.detach(), {k: v.detach() for k, v in out["metrics"].items()}, grads


@pytest.mark.parametrize("lora", [False, True], ids=["weights", "lora"])
@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_layout_gives_the_padded_loss_metrics_and_gradients(tmp_path, tok, data, layout, precompute, lora):
    policy = _policy(tok, lora)
    _, loss_p, metrics_p, grads_p = _step(tmp_path, tok, data, policy, "padded", precompute, lora)
    batch, loss, metrics, grads = _step(tmp_path, tok, data, policy, layout, precompute, lora)

    assert batch["attention_mask"].dim() == 4  # really the other layout
    torch.testing.assert_close(loss, loss_p, atol=1e-10, rtol=1e-9)
    assert metrics.keys() == metrics_p.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), metrics_p[name].double(), atol=1e-9, rtol=1e-7, msg=name)
    assert grads.keys() == grads_p.keys() and grads
    if lora:
        assert all("lora_" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_p[name], atol=1e-7, rtol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_kl_half_has_rows_of_its_own_and_runs_without_grad(tmp_path, tok, data, layout):
    policy = build_tiny_llama(tok, seed=1).double()
    trainer = KTOTrainer(policy, ref_model=build_tiny_llama(tok, seed=2).double(),
                         args=_args(tmp_path, layout, precompute=False), train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    b, width = len(ROWS), batch["input_ids"].shape[1]
    rows = batch["last_index"] // width  # the row of each sequence
    assert rows[:b].max() < rows[b:].min()  # completions first, then the KL pairs, never in one row
    if layout == "shared_prompt":  # 4 distinct prompts: one row each per half
        assert batch["input_ids"].shape[0] == 8 and sorted(torch.bincount(rows[:b]).tolist()) == [1, 1, 2, 2]

    calls = []  # (grad enabled, rows) of each policy forward
    hook = policy.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: calls.append((torch.is_grad_enabled(), args[0].shape[0])))
    trainer.compute_loss(trainer.model, batch).backward()
    hook.remove()
    main_rows = int(rows[b:].min())
    assert calls == [(True, main_rows), (False, batch["input_ids"].shape[0] - main_rows)]
