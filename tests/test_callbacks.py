import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from hfrlhf.callbacks import KLBudgetCallback, _prompt_ids, sample_kl
from hfrlhf.data.collators import PromptCollator
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops.rollout import generate, make_generation_config, truncate_at_stop
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer

PROMPTS = [[{"role": "user", "content": text}] for text in ("Review the film.", "Count to three.", "Say hello.")]
PAIRS = [{"prompt": p, "chosen": [{"role": "assistant", "content": "I loved it, wonderful."}],
          "rejected": [{"role": "assistant", "content": "Boring and bad."}]} for p in PROMPTS] * 2


def _peft(tok, seed=1, b_std=0.0):
    model = get_peft_model(build_tiny_llama(tok, seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if b_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=b_std, generator=torch.Generator().manual_seed(len(name)))
    return model


def _by_hand(model, ref, tok, prompt, completion_ids, temperature):
    """KL term of one sample from plain full-vocabulary forwards: sum_t log p - log q at the temperature."""
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_ids, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    n = len(prompt_ids)

    def logp(m):
        logits = m(input_ids=ids).logits[0, n - 1:-1].double() / temperature
        return torch.log_softmax(logits, -1).gather(1, ids[0, n:, None]).sum()

    return float(logp(model) - logp(ref))


def test_sample_kl_is_zero_for_the_reference_itself_and_matches_plain_forwards():
    tok = build_tiny_tokenizer()
    fresh = _peft(tok)  # LoRA B = 0: the policy is its reference
    assert torch.equal(sample_kl(fresh, tok, PROMPTS, max_new_tokens=8), torch.zeros(len(PROMPTS)))

    policy, ref = _peft(tok, b_std=0.3), build_tiny_llama(tok, seed=1)
    kl = sample_kl(policy, tok, PROMPTS, max_new_tokens=8, temperature=0.7, seed=3)
    kl_explicit = sample_kl(policy, tok, PROMPTS, ref_model=ref, max_new_tokens=8, temperature=0.7, seed=3)
    torch.testing.assert_close(kl, kl_explicit, atol=1e-5, rtol=0)  # adapter off == the base model
    assert kl.abs().max() > 0.01

    # the same samples again (same seed, the same batch of prompts), scored by hand
    batch = PromptCollator(tok.pad_token_id)([{"prompt_ids": p} for p in _prompt_ids(tok, PROMPTS)])
    torch.manual_seed(3)
    config = make_generation_config(max_new_tokens=8, temperature=0.7, top_k=None, top_p=1.0,
                                    stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    policy.eval()
    out = truncate_at_stop(generate(policy, batch["input_ids"], batch["attention_mask"], config), [tok.eos_token_id],
                           tok.pad_token_id)
    with torch.no_grad():
        expected = [_by_hand(policy, ref, tok, p, out.ids[i, :out.lengths[i]].tolist(), 0.7)
                    for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(kl.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rollback", [True, False])
def test_training_stops_at_the_first_estimate_over_the_budget(tmp_path, rollback):
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=0.3, every_n_steps=2, first_step=2, max_new_tokens=8, rollback=rollback,
                              near_budget=None)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                     per_device_train_batch_size=3, max_steps=40, learning_rate=1e-1, logging_steps=1,
                     disable_tqdm=True, seed=0, max_length=48, beta=0.1)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                         callbacks=[budget])
    trainer.train()
    steps = [s for s, _ in budget.estimates]
    kls = [k for _, k in budget.estimates]
    assert budget.stopped_at is not None and trainer.state.global_step == budget.stopped_at < 40
    assert steps == list(range(2, budget.stopped_at + 1, 2)) and len(steps) >= 2
    assert kls[-1] >= 0.3 and all(k < 0.3 for k in kls[:-1])
    logged = [h["kl_budget/kl"] for h in trainer.state.log_history if "kl_budget/kl" in h]
    assert logged == kls
    # the model training ends with: the last one under the budget (rollback), or the one that went over it
    final = float(sample_kl(trainer.model, tok, PROMPTS, max_new_tokens=8).mean())
    if rollback:
        assert budget.kept_step == steps[-2] and final == pytest.approx(kls[-2], abs=1e-5)
    else:
        assert budget.kept_step is None and final == pytest.approx(kls[-1], abs=1e-5)


def test_rollback_before_the_first_estimate_under_the_budget_restores_the_initial_weights(tmp_path):
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=1e-6, first_step=1, max_new_tokens=8)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                     per_device_train_batch_size=3, max_steps=5, learning_rate=5e-2, disable_tqdm=True, seed=0,
                     max_length=48)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                         callbacks=[budget])
    trainer.train()
    assert budget.stopped_at == 1 and budget.kept_step == 0
    assert torch.equal(sample_kl(trainer.model, tok, PROMPTS, max_new_tokens=8), torch.zeros(len(PROMPTS)))


def _dpo_with_budget(tmp_path, tok, budget, max_steps, learning_rate):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                     per_device_train_batch_size=3, max_steps=max_steps, learning_rate=learning_rate,
                     lr_scheduler_type="constant", disable_tqdm=True, seed=0, max_length=48, beta=0.1)
    return DPOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=Dataset.from_list(PAIRS),
                      processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                      callbacks=[budget])


def test_near_the_budget_every_step_is_estimated(tmp_path, monkeypatch):
    # scripted estimates, so the schedule is tested whatever the tiny model's KL does: 0.05 nats per step
    import hfrlhf.callbacks as callbacks

    trainer = None
    monkeypatch.setattr(callbacks, "_sample_kl",
                        lambda *args, **kwargs: torch.full((3,), 0.05 * trainer.state.global_step))
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=0.5, every_n_steps=4, first_step=1, near_budget=0.7, max_new_tokens=8)
    trainer = _dpo_with_budget(tmp_path, tok, budget, max_steps=30, learning_rate=1e-2)
    trainer.train()
    # every 4 steps from 1 (0.05, 0.25) until an estimate passes 0.35 (0.45 at step 9), then every step: 0.5 at 10
    assert [step for step, _ in budget.estimates] == [1, 5, 9, 10]
    assert budget.stopped_at == trainer.state.global_step == 10 and budget.kept_step == 9


def test_a_run_that_ends_under_the_budget_is_estimated_at_its_last_step(tmp_path):
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=1e3, every_n_steps=4, first_step=2, max_new_tokens=8)
    trainer = _dpo_with_budget(tmp_path, tok, budget, max_steps=7, learning_rate=1e-2)
    trainer.train()
    assert [s for s, _ in budget.estimates] == [2, 6, 7] and budget.stopped_at is None and budget.kept_step is None


@pytest.mark.parametrize("kwargs", [dict(max_kl=0.0), dict(max_kl=1.0, every_n_steps=0), dict(max_kl=1.0, first_step=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="max_kl > 0"):
        KLBudgetCallback(PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="near_budget"):
        KLBudgetCallback(PROMPTS, max_kl=1.0, near_budget=1.5)
    with pytest.raises(ValueError, match="at least one prompt"):
        KLBudgetCallback([], max_kl=1.0)
