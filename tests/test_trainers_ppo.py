import copy
import json
import os

import pytest
import torch
from helpers import assert_adapter_depends_on_seed_alone
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    LlamaForSequenceClassification,
    PrinterCallback,
    ProgressCallback,
)

from hfrlhf.models.reward_head import RewardEnsemble, sequence_rewards
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.ops.rollout import sequence_batch, truncate_at_stop
from hfrlhf.trainers.ppo import PPOConfig, PPOTrainer

PROMPTS = [{"prompt": p} for p in ["Hi", "Hello there", "The quick", "one two", "What is", "I really", "Write a",
                                   "The food"]] * 2
CHAT_PROMPTS = [{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in PROMPTS[:8]]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def target_reward(tok):
    """Fraction of a completion's tokens equal to the token "Z" (absent from the tiny tokenizer's merges)."""
    z = tok.convert_tokens_to_ids("Z")

    def reward(prompts, completions):
        out = []
        for text in completions:
            ids = tok(text, add_special_tokens=False).input_ids
            out.append(sum(i == z for i in ids) / max(1, len(ids)))
        return out

    return reward


def length_reward(prompts, completions):
    return [len(c) / 10 for c in completions]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, disable_tqdm=True, seed=0,
                response_length=6, temperature=1.0, num_ppo_epochs=2, num_mini_batches=2, kl_coef=0.01,
                learning_rate=1e-3, num_sample_generations=0, lr_scheduler_type="constant")
    base.update(kw)
    return PPOConfig(**base)


def _train(trainer, **kw):
    trainer.remove_callback(PrinterCallback)
    trainer.train(**kw)
    return [h for h in trainer.state.log_history if "objective/scores" in h]


def _scores(logs):
    return [h["objective/scores"] for h in logs if "objective/scores" in h]


# --- config -------------------------------------------------------------------------------------------------------
def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tok):
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    trainer = PPOTrainer(_args(tmp_path), no_pad, build_tiny_llama(tok), reward_model=length_reward,
                         train_dataset=PROMPTS[:4])
    assert no_pad.pad_token_id == tok.eos_token_id and trainer.pad_id == tok.eos_token_id
    assert _train(trainer)


def test_config_validates_combinations(tmp_path):
    with pytest.raises(ValueError, match="num_generations >= 2"):
        _args(tmp_path, advantage_estimator="rloo")
    with pytest.raises(ValueError, match="num_mini_batches=3"):
        _args(tmp_path, num_mini_batches=3)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        _args(tmp_path, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="advantage_estimator"):
        _args(tmp_path, advantage_estimator="ppo")
    args = _args(tmp_path, max_new_tokens=9, max_length=100, num_generations=2, gradient_accumulation_steps=2)
    assert args.response_length == 9 and args.max_prompt_length == 91 and args.micro_batch_size == 2


# --- progress -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disable_tqdm, main_process", [(False, True), (True, True), (False, False)],
                         ids=["shown", "disable_tqdm", "other_process"])
def test_rollout_generation_progress_bar(tmp_path, tok, capsys, monkeypatch, disable_tqdm, main_process):
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true") and not disable_tqdm and main_process:
        pytest.skip("TQDM_DISABLE hides every bar in this environment")
    trainer = PPOTrainer(_args(tmp_path, disable_tqdm=disable_tqdm, response_length=5), tok, build_tiny_llama(tok),
                         reward_model=length_reward, train_dataset=PROMPTS[:4])
    trainer.remove_callback(ProgressCallback)  # the Trainer's own bar over steps: only the rollout bar may print
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: main_process)
    ticks = []
    embeddings = trainer.model.policy.get_input_embeddings()
    embeddings.register_forward_hook(lambda *_: ticks.append(1))
    capsys.readouterr()
    _train(trainer)
    err = capsys.readouterr().err
    if disable_tqdm or not main_process:
        assert "rollout: generating" not in err
    else:
        assert "rollout: generating 4 responses" in err and "0/5" in err
    assert ticks  # generation ran either way


# --- learning on a toy task ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator, prompts, generations", [("gae", 16, 1), ("rloo", 4, 4)])
def test_toy_reward_rises(tmp_path, tok, target_reward, estimator, prompts, generations):
    args = _args(tmp_path, advantage_estimator=estimator, per_device_train_batch_size=prompts,
                 num_generations=generations, max_steps=20, response_length=8, num_ppo_epochs=4, learning_rate=1e-2)
    trainer = PPOTrainer(args, tok, build_tiny_llama(tok), reward_model=target_reward, train_dataset=PROMPTS)
    scores = _scores(_train(trainer))
    assert len(scores) == 20
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    # from near zero to several times that; the exact level after 20 steps moves with the thread count (float
    # summation order), so the bar is well below what either 1 or 2 threads reach (0.147 and above)
    assert first < 0.02 and last > 0.1, scores


# --- LoRA: one base model for policy, reference and critic -----------------------------------------------------------
def test_lora_one_base_only_adapters_and_head_change(tmp_path, tok):
    base = build_tiny_llama(tok, seed=5)
    reference = build_tiny_llama(tok, seed=5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = PPOTrainer(_args(tmp_path, max_steps=2, learning_rate=1e-2), tok, base, reward_model=length_reward,
                         train_dataset=PROMPTS, peft_config=lora)
    ac = trainer.model
    assert ac.policy is not None and ac.critic is None and ac.critic_adapter == "critic"
    assert trainer.ref_model is None  # the reference is the base with adapters off
    before = {n: p.detach().clone() for n, p in ac.named_parameters()}
    _train(trainer)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    changed = {n for n, p in ac.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all((".policy." in n or ".critic." in n or n.startswith("value_head")) for n in changed)
    assert any(".policy." in n for n in changed) and any(".critic." in n for n in changed)
    assert {n for n, p in ac.named_parameters() if id(p) in optimized} == {n for n, p in ac.named_parameters()
                                                                            if p.requires_grad}
    assert any(n.startswith("value_head") for n in changed)
    # reference = adapters off = the untouched base model
    responses = truncate_at_stop(torch.tensor([[40, 41, 2]]), [2], 2)
    batch = sequence_batch(torch.tensor([[5, 6, 7]]), torch.ones(1, 3), responses, 2)
    from hfrlhf.ops.rollout import reference_logps

    torch.testing.assert_close(reference_logps(ac.policy, batch), batch_logprobs(reference, batch).token_logps)
    # save_model writes a plain adapter loadable onto the base model
    trainer.save_model(str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(build_tiny_llama(tok, seed=5), str(tmp_path / "final"))
    torch.testing.assert_close(batch_logprobs(loaded, batch).token_logps, batch_logprobs(ac.policy, batch).token_logps)


# --- checkpoint and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_resume_matches_an_uninterrupted_run(tmp_path, tok, lora):
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0) if lora else None
    kw = dict(max_steps=4, per_device_train_batch_size=4, adaptive_kl=True, kl_target=0.01, kl_horizon=100,
              normalize_rewards=True, save_strategy="steps", save_steps=2)

    def make(out):
        args = _args(tmp_path, output_dir=str(tmp_path / out), **kw)
        return PPOTrainer(args, tok, build_tiny_llama(tok, seed=1), reward_model=length_reward,
                          train_dataset=PROMPTS[:10], peft_config=peft)

    straight = make("straight")
    _train(straight)
    first = make("resumed")
    first.args.max_steps = 2
    _train(first)
    second = make("resumed")
    logs = [h for h in _train(second, resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2")) if h["step"] > 2]
    assert second.state.global_step == 4 and [h["step"] for h in logs] == [3, 4]
    a, b = dict(straight.model.named_parameters()), dict(second.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    assert straight.kl_ctl.value == pytest.approx(second.kl_ctl.value)
    assert straight.running.state_dict() == pytest.approx(second.running.state_dict())
    assert _scores(logs) == pytest.approx(_scores(straight.state.log_history)[2:])


# --- reward models, the critic's start, PTX, logging -----------------------------------------------------------------
def _reward_model(tok, seed=0):
    config = build_tiny_llama(tok).config
    config.num_labels = 1
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    return model


def test_reward_model_with_the_policys_tokenizer_initialises_the_critic(tmp_path, tok):
    rm = _reward_model(tok)
    trainer = PPOTrainer(_args(tmp_path), tok, build_tiny_llama(tok), reward_model=rm, train_dataset=CHAT_PROMPTS)
    ac = trainer.model
    assert not trainer.scorer.retokenize and ac.critic is not None
    torch.testing.assert_close(ac.value_head.linear.weight, rm.score.weight)  # DeepSpeed-Chat convention
    assert ac.critic is not rm.model  # a copy: the reward model stays frozen
    logs = _train(trainer)
    assert all(p.requires_grad is False for p in trainer.scorer.model.parameters())
    assert "val/vpred" in logs[0]


def test_reward_model_with_another_tokenizer_rescores_text(tmp_path, tok):
    other = build_tiny_tokenizer(vocab_size=290)
    assert other.get_vocab() != tok.get_vocab()
    seen = []
    rm = _reward_model(other)
    forward = rm.model.forward

    def spy(*a, **kw):
        seen.append(kw["input_ids"])
        return forward(*a, **kw)

    rm.model.forward = spy
    trainer = PPOTrainer(_args(tmp_path), tok, build_tiny_llama(tok), reward_model=rm, train_dataset=CHAT_PROMPTS,
                         reward_processing_class=other)
    assert trainer.scorer.retokenize and trainer.model.critic is not None  # critic from the policy instead
    _train(trainer)
    assert seen and all(int(ids.max()) < len(other) for ids in seen)
    assert "<|im_start|>assistant" in other.decode(seen[0][0])


def test_ptx_samples_metrics_and_saved_policy(tmp_path, tok, target_reward):
    sft = [{"prompt": "Hi", "completion": " hello there"}, {"prompt": "Count", "completion": " one two three"}]
    args = _args(tmp_path, max_steps=2, ptx_coef=0.5, entropy_coef=0.01, num_sample_generations=2,
                 missing_eos_penalty=1.0)
    trainer = PPOTrainer(args, tok, build_tiny_llama(tok), reward_model=target_reward, train_dataset=PROMPTS,
                         ptx_dataset=sft)
    logs = _train(trainer)
    for name in ("objective/scores", "objective/kl", "objective/entropy", "objective/non_score_reward",
                 "policy/clipfrac", "policy/approxkl", "val/clipfrac", "val/vpred", "val/error", "loss/policy_avg",
                 "loss/value_avg", "lengths/mean", "eos_rate", "beta", "loss/ptx", "policy/entropy_avg"):
        assert name in logs[0], name
    rows = [json.loads(line) for line in open(tmp_path / "out" / "samples.jsonl")]
    assert {r["step"] for r in rows} == {0, 1} and {"prompt", "completion", "score"} <= rows[0].keys()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    for name, p in trainer.model.policy.named_parameters():
        torch.testing.assert_close(reloaded.get_parameter(name), p)


def test_evaluate_is_repeatable_and_leaves_the_training_stream_alone(tmp_path, tok, target_reward):
    trainer = PPOTrainer(_args(tmp_path), tok, build_tiny_llama(tok), reward_model=target_reward,
                         train_dataset=PROMPTS, eval_dataset=PROMPTS[:4])
    trainer.remove_callback(PrinterCallback)
    state = torch.random.get_rng_state()
    first, second = trainer.evaluate(), trainer.evaluate()
    assert torch.equal(state, torch.random.get_rng_state())
    assert first == second and {"eval_objective/scores", "eval_lengths/mean", "eval_eos_rate"} <= first.keys()


def test_adaptive_kl_moves_beta(tmp_path, tok):
    # KL stays far below the target, so the clipped error is -0.2 at every update of 4 responses
    args = _args(tmp_path, max_steps=2, adaptive_kl=True, kl_coef=0.1, kl_target=100.0, kl_horizon=10,
                 kl_estimator="k3")
    trainer = PPOTrainer(args, tok, build_tiny_llama(tok), reward_model=length_reward, train_dataset=PROMPTS)
    logs = _train(trainer)
    assert [h["beta"] for h in logs] == pytest.approx([0.1, 0.1 * 0.92])
    assert trainer.kl_ctl.value == pytest.approx(0.1 * 0.92**2)


# --- the bundled SmolLM2 with LoRA and a sentiment reward --------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_lora_vader_sentiment_rises(tmp_path):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from hfrlhf.models.loading import load_bundled

    vader = SentimentIntensityAnalyzer()
    model, tokenizer = load_bundled()
    topics = ["the movie you saw last night", "your morning commute", "the weather today", "a new restaurant in town",
              "the book you are reading", "your last holiday", "a football match", "the city you live in"]
    prompts = [{"prompt": [{"role": "user", "content": f"In one short sentence, tell me what you think about {t}."}]}
               for t in topics]
    args = PPOConfig(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", logging_steps=1, seed=0,
                     disable_tqdm=True, advantage_estimator="rloo", num_generations=4, per_device_train_batch_size=2,
                     max_steps=8, response_length=16, temperature=1.0, learning_rate=1e-3, num_ppo_epochs=2,
                     kl_coef=0.05, lr_scheduler_type="constant", per_device_eval_batch_size=8,
                     num_sample_generations=0)
    trainer = PPOTrainer(args, tokenizer, model, train_dataset=prompts, eval_dataset=prompts * 3,
                         reward_model=lambda p, c: [vader.polarity_scores(x)["compound"] for x in c],
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    trainer.remove_callback(PrinterCallback)
    before = trainer.evaluate()["eval_objective/scores"]  # the same seeded samples before and after
    trainer.train()
    after = trainer.evaluate()["eval_objective/scores"]
    assert after > before + 0.1, (before, after)


def test_a_reward_ensemble_scores_rollouts_and_its_first_member_initialises_the_critic(tmp_path, tok):
    members = [_reward_model(tok, seed=s) for s in (3, 4)]
    ensemble = RewardEnsemble(members, combine="min")
    trainer = PPOTrainer(_args(tmp_path), tok, build_tiny_llama(tok), reward_model=ensemble,
                         train_dataset=CHAT_PROMPTS)
    torch.testing.assert_close(trainer.model.value_head.linear.weight, members[0].score.weight)
    seen = []
    scorer = trainer.scorer

    def spy(prompts, completions, batch, ended):
        scores = scorer(prompts, completions, batch, ended)
        with torch.no_grad():
            each = torch.stack([sequence_rewards(m, batch) for m in members])
        seen.append((scores, each))
        return scores

    trainer.scorer = spy
    _train(trainer)
    assert seen
    for scores, each in seen:  # the policy's own tokens, scored by each member, the lower one kept
        torch.testing.assert_close(scores, each.min(dim=0).values, atol=1e-4, rtol=0)
    assert all(not p.requires_grad for p in ensemble.parameters())


def test_shared_lora_adapters_depend_on_the_seed_alone(tmp_path, tok):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    make = lambda seed: PPOTrainer(_args(tmp_path, seed=seed), tok, build_tiny_llama(tok, seed=5),  # noqa: E731
                                   reward_model=length_reward, train_dataset=PROMPTS, peft_config=lora)
    names = [n for n, _ in make(1).model.named_parameters() if "lora_A" in n]
    assert any(".critic." in n for n in names) and any(".policy." in n for n in names)
    assert_adapter_depends_on_seed_alone(make)


def test_text_rows_are_refused_as_prompts_and_taken_as_ptx_data(tmp_path, tok):
    texts = [{"text": " The quick brown fox."}, {"text": " one two three"}]
    with pytest.raises(ValueError, match=r"expected prompt data, got text data .* only SFTTrainer \(hfrlhf sft\)"):
        PPOTrainer(_args(tmp_path), tok, build_tiny_llama(tok), reward_model=length_reward, train_dataset=texts)
    trainer = PPOTrainer(_args(tmp_path, ptx_coef=0.5), tok, build_tiny_llama(tok), reward_model=length_reward,
                         train_dataset=PROMPTS[:4], ptx_dataset=texts)
    first = trainer.ptx_dataset[0]
    assert first["prompt_ids"] + first["completion_ids"] == tok(" The quick brown fox.").input_ids + [tok.eos_token_id]
