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


@pytest.mark.parametrize("rescore_policy", [False, True])
def test_sample_kl_is_zero_for_the_reference_itself_and_matches_plain_forwards(rescore_policy):
    tok = build_tiny_tokenizer()
    fresh = _peft(tok)  # LoRA B = 0: the policy is its reference
    kl_fresh = sample_kl(fresh, tok, PROMPTS, max_new_tokens=8, rescore_policy=rescore_policy)
    if rescore_policy:  # both log-probs from teacher-forced passes of the same weights
        assert torch.equal(kl_fresh, torch.zeros(len(PROMPTS)))
    else:  # the policy's from the cached decode: rounding only
        torch.testing.assert_close(kl_fresh, torch.zeros(len(PROMPTS)), atol=1e-4, rtol=0)

    policy, ref = _peft(tok, b_std=0.3), build_tiny_llama(tok, seed=1)
    kl = sample_kl(policy, tok, PROMPTS, max_new_tokens=8, temperature=0.7, seed=3, rescore_policy=rescore_policy)
    kl_explicit = sample_kl(policy, tok, PROMPTS, ref_model=ref, max_new_tokens=8, temperature=0.7, seed=3,
                            rescore_policy=rescore_policy)
    torch.testing.assert_close(kl, kl_explicit, atol=1e-5, rtol=0)  # adapter off == the base model
    assert kl.abs().max() > 0.01
    other = sample_kl(policy, tok, PROMPTS, max_new_tokens=8, temperature=0.7, seed=3, rescore_policy=not rescore_policy)
    torch.testing.assert_close(kl, other, atol=1e-4, rtol=0)  # the same samples, either way of scoring the policy

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
    assert torch.equal(sample_kl(trainer.model, tok, PROMPTS, max_new_tokens=8, rescore_policy=True),
                       torch.zeros(len(PROMPTS)))


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


def _lora_b_energy(model):
    return sum(float(p.detach().pow(2).sum()) for n, p in model.named_parameters() if "lora_B" in n)


SCALE = 2.0  # the scripted KL's factor: with lr 2e-3 it passes 0.5 nats after a few steps


def _scripted_kl(monkeypatch, holder, power, scale):
    """KL estimates scripted as ``scale * (sum of squared LoRA B entries) ** (power / 2)``: scaling every B by lam
    multiplies them by ``lam ** power``, which is what the interpolation's search has to find."""
    import hfrlhf.callbacks as callbacks

    monkeypatch.setattr(callbacks, "_sample_kl", lambda model, *a, **k: torch.full(
        (3,), scale * _lora_b_energy(holder["trainer"].model) ** (power / 2)))


@pytest.mark.parametrize("power, tries", [(2, 1), (3, 2)])
def test_interpolation_finds_the_budget_on_the_line_to_the_reference(tmp_path, monkeypatch, power, tries):
    # KL = c * lam ** p along the line. p = 2 (the first guess's model) lands on the target at once; p = 3 needs a
    # second try, fitted through the first: both land on the middle of [0.85, 1) * max_kl up to float rounding
    holder = {}
    _scripted_kl(monkeypatch, holder, power, scale=SCALE)
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=0.5, every_n_steps=1, first_step=1, near_budget=None,
                              interpolate_past=2.0, interpolate_tries=3, max_new_tokens=8)
    trainer = holder["trainer"] = _dpo_with_budget(tmp_path, tok, budget, max_steps=60, learning_rate=2e-3)
    trainer.train()
    kls = [k for _, k in budget.estimates]
    assert kls[-1] >= 1.0 and all(k < 1.0 for k in kls[:-1])  # trained on past 0.5 up to 2 * 0.5
    assert any(0.5 <= k < 1.0 for k in kls), kls
    assert len(budget.interpolation) == tries
    lam, got = budget.interpolation[-1]
    target = 0.925 * 0.5
    assert got == pytest.approx(target, rel=1e-4)
    assert lam == pytest.approx((target / kls[-1]) ** (1 / power), rel=1e-4)
    assert budget.kept_lambda == lam and budget.kept_step is None
    # the model ends at that lam: its scripted estimate is the interpolation's
    assert SCALE * _lora_b_energy(trainer.model) ** (power / 2) == pytest.approx(got, rel=1e-5)
    assert {"kl_budget/kept_lambda": lam, "step": budget.stopped_at} in trainer.state.log_history


def test_interpolation_that_finds_no_lam_under_the_budget_rolls_back(tmp_path, monkeypatch):
    import hfrlhf.callbacks as callbacks

    holder = {}
    _scripted_kl(monkeypatch, holder, 2, scale=SCALE)
    real = KLBudgetCallback.interpolate

    def stubborn(self, model, kl, estimate):  # every interpolated estimate comes out over the budget
        return real(self, model, kl, lambda: 10.0)

    monkeypatch.setattr(callbacks.KLBudgetCallback, "interpolate", stubborn)
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=0.5, every_n_steps=1, first_step=1, near_budget=None,
                              interpolate_past=2.0, interpolate_tries=2, max_new_tokens=8)
    trainer = holder["trainer"] = _dpo_with_budget(tmp_path, tok, budget, max_steps=60, learning_rate=2e-3)
    trainer.train()
    assert len(budget.interpolation) == 2 and budget.kept_lambda is None
    kept = max(s for s, k in budget.estimates if k < 0.5)
    assert budget.kept_step == kept
    assert SCALE * _lora_b_energy(trainer.model) == pytest.approx(dict(budget.estimates)[kept], rel=1e-5)


def test_interpolation_scales_the_adapters_update_and_nothing_else(tmp_path, monkeypatch):
    # the kept model is W + lam * s * B A with A as trained: B scaled, A untouched, and dividing peft's own scaling
    # by lam gives back the trained model's logits
    from peft.tuners.lora import LoraLayer

    holder, seen = {}, {}
    _scripted_kl(monkeypatch, holder, 2, scale=SCALE)
    real = KLBudgetCallback.interpolate

    def spy(self, model, kl, estimate):
        seen.update({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
        return real(self, model, kl, estimate)

    monkeypatch.setattr(KLBudgetCallback, "interpolate", spy)
    tok = build_tiny_tokenizer()
    budget = KLBudgetCallback(PROMPTS, max_kl=0.5, every_n_steps=1, first_step=1, near_budget=None,
                              interpolate_past=2.0, max_new_tokens=8)
    trainer = holder["trainer"] = _dpo_with_budget(tmp_path, tok, budget, max_steps=60, learning_rate=2e-3)
    trainer.train()
    lam, model = budget.kept_lambda, trainer.model
    assert lam is not None and 0 < lam < 1
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(seen) and any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    for name, p in model.named_parameters():
        if name in seen:
            torch.testing.assert_close(p.detach(), seen[name] * lam if "lora_B" in name else seen[name],
                                       rtol=0, atol=0)
    ids = torch.tensor([tok("Review the film, please.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        kept = model(input_ids=ids).logits
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.scaling = {k: v / lam for k, v in m.scaling.items()}
        undone = model(input_ids=ids).logits
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.scaling = {k: v * lam for k, v in m.scaling.items()}
        for name, p in model.named_parameters():
            if name in seen:
                p.copy_(seen[name])
        trained = model(input_ids=ids).logits
    torch.testing.assert_close(undone, trained, rtol=1e-5, atol=1e-5)
    assert (kept - trained).abs().max() > 1e-4  # and the kept model is not the trained one


def test_interpolation_moves_other_weights_on_the_line_from_their_start():
    # no adapter: every trainable weight goes W0 + lam * (W - W0); estimates scripted as 8 * |W - W0|^2 (p = 2)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    trained = {k: v.detach().clone() for k, v in model.named_parameters()}
    dist = sum(float((trained[k] - start[k]).pow(2).sum()) for k in start)
    budget = KLBudgetCallback(PROMPTS, max_kl=dist, interpolate_past=2.0)
    budget._start = start

    def estimate():
        return 8.0 * sum(float((v - start[k]).pow(2).sum()) for k, v in model.named_parameters())

    budget.interpolate(model, estimate(), estimate)
    lam = budget.kept_lambda
    assert lam == pytest.approx((0.925 / 8) ** 0.5, rel=1e-6) and len(budget.interpolation) == 1
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), start[k] + lam * (trained[k] - start[k]))


def test_bad_interpolation_settings_are_refused():
    for kwargs in (dict(interpolate_past=0.9), dict(interpolate_past=2.0, interpolate_tries=0),
                   dict(interpolate_past=2.0, interpolate_low=1.0)):
        with pytest.raises(ValueError, match="interpolate_past >= 1"):
            KLBudgetCallback(PROMPTS, max_kl=1.0, **kwargs)
