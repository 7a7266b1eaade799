import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import assert_adapter_depends_on_seed_alone
from peft import LoraConfig, PeftModel
from transformers import AutoModelForSequenceClassification, EvalPrediction, LlamaForSequenceClassification

from hfrlhf.data.collators import ListwiseCollator, PairwiseCollator
from hfrlhf.data.tokenize import tokenize_dataset
from hfrlhf.metrics import available_metrics, load_metric
from hfrlhf.models.reward_head import RewardEnsemble
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.reward import (
    RewardConfig,
    RewardTrainer,
    compute_accuracy,
    score_completions,
    sequence_rewards,
)

PAIRS = [
    {"prompt": [{"role": "user", "content": "Review the film."}],
     "chosen": [{"role": "assistant", "content": "I loved it, wonderful acting."}],
     "rejected": [{"role": "assistant", "content": "Boring."}]},
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "The capital of France is a terrible question."}]},
    {"prompt": [{"role": "user", "content": "Count to three."}],
     "chosen": [{"role": "assistant", "content": "one two three"}],
     "rejected": [{"role": "assistant", "content": "four five"}]},
    {"prompt": [{"role": "user", "content": "Say something kind."}],
     "chosen": [{"role": "assistant", "content": "The staff were kind and the food was good."}],
     "rejected": [{"role": "assistant", "content": "I hated every minute."}]},
]

LISTS = [
    {"prompt": "Rate the film:", "responses": [" wonderful", " boring", " fine", " great acting"],
     "scores": [3.0, 0.0, 1.0, 2.0]},
    {"prompt": "Capital of France?", "responses": [" Paris.", " Lyon.", " a dog"], "scores": [2.0, 1.0, 0.0]},
]

POINTS = [
    {"prompt": "Rate this idea: a picnic.", "completion": " Lovely, bring fruit.", "score": 0.9},
    {"prompt": "Rate this idea: a picnic.", "completion": " Ants everywhere.", "score": -0.5},
    {"prompt": "Name a colour.", "completion": " Blue.", "score": 0.4},
    {"prompt": "Name a colour.", "completion": " The food was good.", "score": -0.8},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tok):
    return tokenize_dataset(Dataset.from_list(PAIRS), tok, max_length=64)


def _reward_model(tok, seed=0, attn="sdpa"):
    config = copy.deepcopy(build_tiny_llama(tok).config)
    config.num_labels = 1
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, disable_tqdm=True, seed=0)
    base.update(kw)
    return RewardConfig(**base)


def _plain_reward(model, ids):
    """Independent path: HF's own forward of one unpadded sequence, pooled at its last token."""
    pad = model.config.pad_token_id
    model.config.pad_token_id = None  # batch of one: HF pools at position -1, the EOS
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].double().item()
    finally:
        model.config.pad_token_id = pad


def _rewards(model, batch):
    with torch.no_grad():
        return sequence_rewards(model, batch).double()


def test_bradley_terry_loss_equals_hand_computation_from_plain_forwards(tmp_path, tok, pairs):
    model = _reward_model(tok, seed=1)
    trainer = RewardTrainer(model, args=_args(tmp_path), train_dataset=pairs, processing_class=tok)
    feats = [pairs[i] for i in range(4)]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(feats))
    chosen = [_plain_reward(model, f["prompt_ids"] + f["chosen_ids"]) for f in feats]
    rejected = [_plain_reward(model, f["prompt_ids"] + f["rejected_ids"]) for f in feats]
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert len(set(chosen + rejected)) == 8  # the rewards are not trivially equal


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_right_left_packed_and_shared_prompt_layouts_give_the_same_rewards(tok, pairs, attn):
    model = _reward_model(tok, seed=2, attn=attn).eval()
    feats = [pairs[i] for i in range(4)]
    pad = tok.pad_token_id
    expected = torch.tensor([_plain_reward(model, f["prompt_ids"] + f[k])
                             for k in ("chosen_ids", "rejected_ids") for f in feats], dtype=torch.float64)
    for collator in [PairwiseCollator(pad), PairwiseCollator(pad, padding_side="left"),
                     PairwiseCollator(pad, layout="packed", max_tokens_per_row=128),
                     PairwiseCollator(pad, layout="shared_prompt"),
                     PairwiseCollator(pad, layout="shared_prompt", max_tokens_per_row=256)]:
        got = _rewards(model, collator(feats))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{collator}")


def test_lora_fast_paths_give_the_plain_loss_and_gradients(tmp_path, tok, pairs, monkeypatch):
    # float64 (Llama's RMSNorm still rounds through float32, hence not 1e-12), LoRA: fused LoRA layers in the shared-prompt layout with prompts packed several to a row,
    # against peft's own LoRA forward in the padded layout
    import hfrlhf.ops.logprobs as logprobs
    from hfrlhf.ops.lora import fused_lora

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False,
                      task_type="SEQ_CLS")
    base = _reward_model(tok, seed=4).double()
    feats = [pairs[i] for i in range(4)]
    results = {}
    for name, layout, cap, fused in (("plain", "padded", None, False), ("fast", "shared_prompt", 256, True)):
        monkeypatch.setattr(logprobs, "fused_lora", fused_lora if fused else _no_fusion)
        torch.manual_seed(0)  # the same random (non-zero) adapter weights in both runs
        trainer = RewardTrainer(copy.deepcopy(base), args=_args(tmp_path, layout=layout, max_tokens_per_row=cap),
                                train_dataset=pairs, processing_class=tok, peft_config=lora)
        batch = trainer.data_collator(feats)
        assert batch["input_ids"].shape[0] == (8 if cap is None else 1)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[name] = loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                      if p.grad is not None}
    (plain_loss, plain), (fast_loss, fast) = results["plain"], results["fast"]
    assert fast_loss == pytest.approx(plain_loss, abs=1e-9)
    assert fast.keys() == plain.keys() and len(plain) > 10
    for n, g in plain.items():
        torch.testing.assert_close(fast[n], g, atol=1e-7, rtol=1e-5, msg=n)


def _no_fusion(model):
    """Stands in for ``fused_lora``: peft's own LoRA forward everywhere (no layer fused)."""
    return contextlib.nullcontext(0)


def test_listwise_layouts_give_the_same_rewards(tok):
    model = _reward_model(tok, seed=3).eval()
    feats = tokenize_dataset(Dataset.from_list(LISTS), tok, max_length=64).to_list()
    padded = _rewards(model, ListwiseCollator(tok.pad_token_id)(feats))
    shared = _rewards(model, ListwiseCollator(tok.pad_token_id, layout="shared_prompt")(feats))
    torch.testing.assert_close(padded, shared, atol=1e-5, rtol=0)


def test_hf_pooling_with_pad_equal_to_eos_reads_the_wrong_token(tok, pairs):
    """Why rewards go through last_index: HF's pooling skips a trailing EOS that equals the pad token."""
    model = _reward_model(tok, seed=4).eval()
    f = pairs[0]
    ids = f["prompt_ids"] + f["chosen_ids"]
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert hf != pytest.approx(_plain_reward(model, ids), abs=1e-4)
    assert hf == pytest.approx(_plain_reward(model, ids[:-1]), abs=1e-5)


def test_margin_and_centering_change_the_loss_as_their_formulas_say(tmp_path, tok):
    rows = [dict(r, margin=m) for r, m in zip(PAIRS, [0.5, 1.0, 0.0, 2.0])]
    data = tokenize_dataset(Dataset.from_list(rows), tok, max_length=64)
    model = _reward_model(tok, seed=5)
    feats = [data[i] for i in range(4)]
    plain = RewardTrainer(model, args=_args(tmp_path), train_dataset=data, processing_class=tok)
    centred = RewardTrainer(model, args=_args(tmp_path, center_rewards_coefficient=0.3), train_dataset=data,
                            processing_class=tok)
    batch = plain.data_collator(feats)
    r = _rewards(model, batch)
    c, rj = r[:4], r[4:]
    m = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        with_margin = plain.compute_loss(model, batch).item()
        with_centring = centred.compute_loss(model, batch).item()
        no_margin = plain.compute_loss(model, {k: v for k, v in batch.items() if k != "margin"}).item()
    assert with_margin == pytest.approx((-F.logsigmoid(c - rj - m)).mean().item(), abs=1e-6)
    assert no_margin == pytest.approx((-F.logsigmoid(c - rj)).mean().item(), abs=1e-6)
    assert with_margin > no_margin  # positive margins demand more separation
    assert with_centring - with_margin == pytest.approx(0.3 * ((c + rj) ** 2).mean().item(), abs=1e-6)


def _train_repeated(tmp_path, tok, rows, loss_type, steps=12):
    args = _args(tmp_path, loss_type=loss_type, max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant",
                 per_device_train_batch_size=len(rows), per_device_eval_batch_size=len(rows))
    trainer = RewardTrainer(_reward_model(tok, seed=6), args=args, train_dataset=rows, eval_dataset=rows,
                            processing_class=tok)
    before = trainer.evaluate()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, before, trainer.evaluate(), losses


@pytest.mark.parametrize("loss_type", ["plackett_luce", "all_pairs"])
def test_listwise_training_lowers_the_loss_and_logs_ranking_metrics(tmp_path, tok, loss_type):
    _, before, after, losses = _train_repeated(tmp_path, tok, LISTS, loss_type)
    assert losses[-1] < losses[0]
    assert after["eval_loss"] < before["eval_loss"]
    for key in ("eval_accuracy", "eval_margin", "eval_kendall_tau", "eval_ndcg", "eval_mean_reward"):
        assert key in after
    assert after["eval_kendall_tau"] >= before["eval_kendall_tau"]


def test_pointwise_mse_training_lowers_the_loss(tmp_path, tok):
    _, before, after, losses = _train_repeated(tmp_path, tok, POINTS, "mse")
    assert losses[-1] < losses[0]
    assert after["eval_loss"] < before["eval_loss"]
    assert "eval_mae" in after


def test_logs_trl_metric_names_and_counts_tokens(tmp_path, tok, pairs):
    trainer = RewardTrainer(_reward_model(tok), args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
                            train_dataset=pairs, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
        assert key in logs[0]
    total = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in pairs)
    assert logs[-1]["num_tokens"] == total  # 2 steps of 2 pairs = the whole set once


def test_data_kind_and_loss_must_agree(tmp_path, tok, pairs):
    with pytest.raises(ValueError, match="loss_type='mse' trains on pointwise data.*got pairwise.*bradley_terry"):
        RewardTrainer(_reward_model(tok), args=_args(tmp_path, loss_type="mse"), train_dataset=PAIRS,
                      processing_class=tok)
    with pytest.raises(ValueError, match="loss_type='mse'.*got listwise.*all_pairs"):
        RewardTrainer(_reward_model(tok), args=_args(tmp_path, loss_type="mse"), train_dataset=LISTS,
                      processing_class=tok)
    with pytest.raises(ValueError, match="loss_type='all_pairs'.*got pairwise"):  # tokenized data is not converted
        RewardTrainer(_reward_model(tok), args=_args(tmp_path, loss_type="all_pairs"), train_dataset=pairs,
                      processing_class=tok)
    with pytest.raises(ValueError, match="unknown reward loss_type"):
        _args(tmp_path, loss_type="hinge")
    with pytest.raises(ValueError, match="no reward centring"):
        _args(tmp_path, loss_type="mse", center_rewards_coefficient=0.01)


def test_listwise_rows_for_a_pairwise_loss_become_all_ordered_pairs(tmp_path, tok, caplog):
    with caplog.at_level("WARNING"):
        trainer = RewardTrainer(_reward_model(tok), args=_args(tmp_path), train_dataset=LISTS, processing_class=tok)
    assert "listwise data converted to 9 pairwise records" in caplog.text
    assert len(trainer.train_dataset) == 6 + 3  # C(4, 2) + C(3, 2) pairs, no ties
    trainer.train()


def _reward_params_after(tmp_path, tok, train, bs, ga, **kw):
    model = _reward_model(tok, seed=5).double()  # float64, so the comparison is not about rounding
    # plain SGD: an update proportional to the gradient (Adam would hide a gradient scaled by a constant)
    args = _args(tmp_path / f"bs{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2,
                 learning_rate=0.5, optim="sgd", **kw)
    trainer = RewardTrainer(model, args=args, train_dataset=train, processing_class=tok)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(("loss_type", "rows", "center"), [
    ("bradley_terry", "pairs", 0.05), ("plackett_luce", "lists", None), ("all_pairs", "lists", None),
])
def test_gradient_accumulation_is_exact(tmp_path, tok, pairs, loss_type, rows, center):
    """One batch of n rows and n micro-batches of one row with n accumulation steps make the same updates."""
    train = pairs if rows == "pairs" else LISTS
    n = len(train)
    kw = dict(loss_type=loss_type, center_rewards_coefficient=center)
    whole = _reward_params_after(tmp_path, tok, train, bs=n, ga=1, **kw)
    split = _reward_params_after(tmp_path, tok, train, bs=1, ga=n, **kw)
    start = dict(_reward_model(tok, seed=5).named_parameters())
    moved = 0
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(value, start[name].detach()))
    assert moved > 0


def test_model_must_have_one_label(tmp_path, tok):
    config = copy.deepcopy(build_tiny_llama(tok).config)
    config.num_labels = 3
    with pytest.raises(ValueError, match="num_labels=3"):
        RewardTrainer(LlamaForSequenceClassification(config), args=_args(tmp_path), train_dataset=PAIRS,
                      processing_class=tok)


def test_causal_lm_becomes_a_reward_model_sharing_its_decoder(tmp_path, tok, pairs):
    lm = build_tiny_llama(tok, seed=7)
    trainer = RewardTrainer(lm, args=_args(tmp_path), train_dataset=pairs, processing_class=tok)
    assert isinstance(trainer.model, LlamaForSequenceClassification)
    assert trainer.model.model is lm.model
    trainer.model.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    batch = trainer.data_collator([pairs[i] for i in range(4)])
    torch.testing.assert_close(_rewards(reloaded, batch), _rewards(trainer.model.eval(), batch))


def test_lora_trains_only_adapter_and_head_and_reloads_identically(tmp_path, tok, pairs):
    base = _reward_model(tok, seed=8)
    base.save_pretrained(tmp_path / "base")
    initial = {n: p.detach().clone() for n, p in base.named_parameters()}
    forgot_head = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")  # no task_type, no modules_to_save
    args = _args(tmp_path, max_steps=3, learning_rate=1e-2)
    with pytest.warns(UserWarning, match="modules_to_save lacks the score head"):
        trainer = RewardTrainer(base, args=args, train_dataset=pairs, processing_class=tok, peft_config=forgot_head)
    assert forgot_head.modules_to_save is None  # the user's object is not changed
    assert "score" in trainer.model.peft_config["default"].modules_to_save
    trainer.train()

    changed = set()
    for name, p in trainer.model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        key = key.replace(".modules_to_save.default", "").replace(".original_module", "")
        if key in initial and not torch.equal(p.detach(), initial[key]):
            changed.add(name)
        elif key not in initial:  # lora_A / lora_B
            assert "lora_" in name, name
    assert changed == {"base_model.model.score.modules_to_save.default.weight"}
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_B" in n)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter moved away from its zero init

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")
    ).eval()
    batch = trainer.data_collator([pairs[i] for i in range(4)])
    trained = _rewards(trainer.model.eval(), batch)
    torch.testing.assert_close(_rewards(reloaded, batch), trained, atol=0, rtol=0)
    fresh_head = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    assert not torch.allclose(_rewards(fresh_head, batch), trained)  # the head really was trained and saved


def test_seq_cls_lora_config_is_used_as_is_without_warning(tmp_path, tok, pairs, recwarn):
    config = LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS")
    trainer = RewardTrainer(_reward_model(tok), args=_args(tmp_path), train_dataset=pairs, processing_class=tok,
                            peft_config=config)
    assert not [w for w in recwarn if "modules_to_save" in str(w.message)]
    assert "score" in trainer.model.peft_config["default"].modules_to_save


def test_same_loss_and_update_as_trl_reward_trainer(tmp_path, tok, pairs):
    """TRL 1.16's RewardTrainer, run for real on the same model and tensors (fp32).

    TRL pools where HF's sequence classifier does: the rightmost token that is not the pad token. With
    pad == EOS that skips the EOS, so TRL gets a distinct pad token here; then both read the EOS.
    """
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    model = _reward_model(tok, seed=9)
    trl_tok = copy.deepcopy(tok)
    trl_tok.pad_token = "<|endoftext|>"
    assert trl_tok.pad_token_id != trl_tok.eos_token_id
    trl_data = Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                   "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in pairs])
    common = dict(report_to=[], save_strategy="no", bf16=False, use_cpu=True, per_device_train_batch_size=4,
                  max_steps=1, logging_steps=1, disable_tqdm=True, seed=0, learning_rate=1e-2,
                  gradient_checkpointing=False, center_rewards_coefficient=0.01)
    theirs = TRLRewardTrainer(copy.deepcopy(model), args=TRLRewardConfig(output_dir=str(tmp_path / "trl"), **common),
                              train_dataset=trl_data, processing_class=trl_tok)
    ours = RewardTrainer(copy.deepcopy(model), args=RewardConfig(output_dir=str(tmp_path / "ours"), **common),
                         train_dataset=pairs, processing_class=tok)

    batch_theirs = theirs.data_collator([trl_data[i] for i in range(4)])
    batch_ours = ours.data_collator([pairs[i] for i in range(4)])
    with torch.no_grad():
        assert ours.compute_loss(ours.model, batch_ours).item() == pytest.approx(
            theirs.compute_loss(theirs.model, batch_theirs).item(), abs=1e-6)

    theirs.train()
    ours.train()
    log_theirs, log_ours = theirs.state.log_history[0], ours.state.log_history[0]
    for key in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert log_ours[key] == pytest.approx(log_theirs[key], abs=1e-6), key
    assert log_ours["num_tokens"] == log_theirs["num_tokens"]
    for (name, p_ours), (_, p_theirs) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(p_ours, p_theirs, atol=1e-6, rtol=0, msg=name)


def test_compute_metrics_gets_rewards_and_the_offline_accuracy_module(tmp_path, tok, pairs):
    trainer = RewardTrainer(_reward_model(tok, seed=10), args=_args(tmp_path, per_device_eval_batch_size=3),
                            train_dataset=pairs, eval_dataset=pairs, processing_class=tok,
                            compute_metrics=compute_accuracy)
    seen = {}
    trainer.compute_metrics = lambda p: seen.setdefault("pred", p) and compute_accuracy(p)
    metrics = trainer.evaluate()
    pred = seen["pred"]
    assert pred.predictions.shape == (4, 2) and (pred.label_ids == 0).all()
    batch = trainer.data_collator([pairs[i] for i in range(4)])
    r = _rewards(trainer.model.eval(), batch).float().numpy()
    np.testing.assert_allclose(pred.predictions, np.stack([r[:4], r[4:]], 1), atol=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(float((r[:4] > r[4:]).mean()))


def test_accuracy_metric_module():
    assert "accuracy" in available_metrics()
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1, 0], references=[0, 0, 0], normalize=False) == {"accuracy": 2.0}
    with pytest.raises(ValueError, match="no metric module"):
        load_metric("bleu")
    ties = EvalPrediction(predictions=np.array([[1.0, 1.0], [2.0, 1.0]]), label_ids=np.zeros(2))
    assert compute_accuracy(ties) == {"accuracy": 0.5}  # a tie is not a win


def test_score_completions_matches_plain_forwards(tok):
    model = _reward_model(tok, seed=11)
    prompts = [p["prompt"] for p in PAIRS]
    completions = [p["chosen"] for p in PAIRS]
    got = score_completions(model, tok, prompts, completions, batch_size=3).double()
    data = tokenize_dataset(Dataset.from_list(PAIRS), tok, max_length=64)
    expected = torch.tensor([_plain_reward(model, r["prompt_ids"] + r["chosen_ids"]) for r in data],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


SMOL_PAIRS = [  # short plain text: a few tokens each, so real-model tests stay quick on a CPU
    {"prompt": "How was the film?", "chosen": " Wonderful and moving.", "rejected": " Awful, stupid, boring."},
    {"prompt": "Describe the food.", "chosen": " Fresh and delicious.", "rejected": " Disgusting garbage."},
    {"prompt": "Thank the staff.", "chosen": " Thank you, you were kind.", "rejected": " Go away, idiots."},
    {"prompt": "Greet a friend.", "chosen": " Hello, good to see you!", "rejected": " Ugh, you again."},
]


@pytest.mark.slow
def test_bundled_model_lora_steps_raise_accuracy_and_lower_loss(tmp_path):
    from hfrlhf.models.loading import load_bundled

    torch.manual_seed(0)  # the new score head is random
    model, tok = load_bundled(reward=True)
    rows = SMOL_PAIRS
    peft = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    args = _args(tmp_path, max_steps=3, learning_rate=1e-3, per_device_train_batch_size=4,
                 per_device_eval_batch_size=4, lr_scheduler_type="constant", max_length=32, bf16=None)
    trainer = RewardTrainer(model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tok,
                            peft_config=peft)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_margin"] > before["eval_margin"]
    assert after["eval_accuracy"] > before["eval_accuracy"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True])
def test_bundled_smollm2_lora_and_qlora_train_only_adapter_and_head_and_reload(tmp_path, four_bit):
    """The real model, with LoRA and with 4-bit + LoRA: the loss falls on a repeated batch, only the adapter and
    the score head move, and the saved adapter (with its head) reloads onto a fresh base to the same rewards."""
    from hfrlhf.models.loading import ModelArguments, get_peft_config, load_reward_model, load_tokenizer

    margs = ModelArguments(use_peft=True, load_in_4bit=four_bit, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    tok = load_tokenizer(margs.model_name_or_path)
    torch.manual_seed(0)  # the new score head is random
    model = load_reward_model(margs)
    args = _args(tmp_path, max_steps=3, learning_rate=2e-3, max_length=32, lr_scheduler_type="constant")
    trainer = RewardTrainer(model, args=args, train_dataset=SMOL_PAIRS, processing_class=tok,
                            peft_config=get_peft_config(margs, task_type="SEQ_CLS"))
    # packed 4-bit weights may be re-laid out by the CPU kernels on first use; float weights must not move
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if "lora_" not in n and "modules_to_save" not in n and p.dtype.is_floating_point}
    head = [n for n, _ in trainer.model.named_parameters() if "modules_to_save" in n]
    assert head == ["base_model.model.score.modules_to_save.default.weight"]
    head_before = trainer.model.get_parameter(head[0]).detach().clone()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch).item()
    assert after < before - 0.02, (before, after)
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert not torch.equal(trainer.model.get_parameter(head[0]).detach(), head_before)

    trainer.save_model(str(tmp_path / "adapter"))
    torch.manual_seed(1)  # a different random head on the fresh base: the saved one must replace it
    fresh = load_reward_model(margs)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    torch.testing.assert_close(_rewards(reloaded, batch), _rewards(trained, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("combine", "std_coef"), [("mean", 1.0), ("min", 1.0), ("mean_minus_std", 0.5)])
def test_reward_ensemble_combines_the_members_standardised_rewards(tok, combine, std_coef):
    members = [_reward_model(tok, seed=s) for s in (21, 22, 23)]
    data = tokenize_dataset(Dataset.from_list(PAIRS), tok, max_length=64)
    ids = [r["prompt_ids"] + r[k] for r in data for k in ("chosen_ids", "rejected_ids")]
    # independent path: each member's plain HF forward of each unpadded sequence, combined with numpy
    raw = np.array([[_plain_reward(m, x) for x in ids] for m in members])  # (3, 8)
    offset, scale = raw.mean(axis=1, keepdims=True), raw.std(axis=1, keepdims=True)
    std = (raw - offset) / scale
    expected = {"mean": std.mean(0), "min": std.min(0),
                "mean_minus_std": std.mean(0) - std_coef * std.std(0)}[combine]

    ensemble = RewardEnsemble(members, combine=combine, std_coef=std_coef)
    ensemble.standardize(torch.tensor(raw))
    prompts = [p["prompt"] for p in PAIRS for _ in range(2)]
    completions = [p[k] for p in PAIRS for k in ("chosen", "rejected")]
    got = score_completions(ensemble, tok, prompts, completions, batch_size=3).double()
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=0)
    # the Hugging Face style forward of one unpadded sequence gives the same reward
    for m in members:
        m.config.pad_token_id = None
    with torch.no_grad():
        one = ensemble(input_ids=torch.tensor([ids[1]])).logits
    assert one.shape == (1, 1)
    assert abs(one.item() - expected[1]) < 1e-4


def test_reward_ensemble_refuses_bad_settings_and_calibration(tok):
    m = _reward_model(tok)
    with pytest.raises(ValueError, match="combine='median'"):
        RewardEnsemble([m], combine="median")
    with pytest.raises(ValueError, match="std_coef"):
        RewardEnsemble([m], std_coef=-1)
    with pytest.raises(ValueError, match="at least one member"):
        RewardEnsemble([])
    ensemble = RewardEnsemble([m, m])
    with pytest.raises(ValueError, match=r"expected \(2, N >= 2\)"):
        ensemble.standardize(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same reward"):
        ensemble.standardize(torch.tensor([[1.0, 2.0], [3.0, 3.0]]))


def test_reward_adapter_depends_on_the_seed_alone(tmp_path):
    from peft import LoraConfig

    from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
    from hfrlhf.trainers import RewardConfig, RewardTrainer

    tok = build_tiny_tokenizer()
    rows = Dataset.from_list([{"prompt": "Rate this.", "chosen": "Lovely and kind.", "rejected": "Awful."}] * 2)
    assert_adapter_depends_on_seed_alone(lambda seed: RewardTrainer(
        build_tiny_llama(tok, seed=3), train_dataset=rows, processing_class=tok,
        args=RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False, seed=seed),
        peft_config=LoraConfig(r=4, target_modules="all-linear")))


def test_text_rows_are_refused_naming_the_trainer_that_takes_them(tmp_path, tok):
    with pytest.raises(ValueError, match=r"got text data .*language-modeling rows .* only SFTTrainer \(hfrlhf sft\)"):
        RewardTrainer(_reward_model(tok), args=_args(tmp_path), train_dataset=[{"text": "Hello there."}],
                      processing_class=tok)
