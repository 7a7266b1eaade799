import contextlib
import copy
import math

import pytest
import torch
from datasets import Dataset
from helpers import assert_adapter_depends_on_seed_alone
from peft import LoraConfig, PeftModel

from hfrlhf.data.collators import PairwiseCollator
from hfrlhf.data.tokenize import tokenize_dataset
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer

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


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return tokenize_dataset(Dataset.from_list(PAIRS), tok, max_length=64)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, disable_tqdm=True, seed=0)
    base.update(kw)
    return DPOConfig(**base)


def _seq_logp(model, prompt_ids, completion_ids):
    """Independent path: one plain forward per sequence, full softmax, sum over completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    p = len(prompt_ids)
    return sum(logp[p - 1 + j, t].item() for j, t in enumerate(completion_ids))


def test_sigmoid_loss_equals_hand_computation_from_plain_forwards(tmp_path, tok, data):
    policy = build_tiny_llama(tok, seed=1)
    ref = build_tiny_llama(tok, seed=2)
    trainer = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path, beta=0.3), train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([data[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()

    # -log sigmoid(z), z = beta * ((pc - rc) - (pr - rr)), pair by pair
    expected = _hand_losses(policy, ref, data, lambda chosen, rejected: math.log1p(math.exp(-0.3 * (chosen - rejected))))
    assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_layouts_give_the_padded_loss(tmp_path, tok, data, layout):
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    losses = {}
    for lay in ("padded", layout):
        trainer = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path, layout=lay), train_dataset=data,
                             processing_class=tok)
        batch = trainer.data_collator([data[i] for i in range(4)])
        with torch.no_grad():
            losses[lay] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[layout] == pytest.approx(losses["padded"], abs=1e-5)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_layouts_give_the_padded_gradients(tmp_path, tok, data, layout):
    # the fast layouts must train the same model: every parameter's gradient equals the padded layout's.
    # float64 model (Llama's RMSNorm still rounds through float32, hence not 1e-12); this also checks that the
    # float32 4D mask is cast to the model's dtype: uncast, the gradients differ by ~1e-2
    ref = build_tiny_llama(tok, seed=2)
    grads = {}
    for lay in ("padded", layout):
        policy = build_tiny_llama(tok, seed=1).double()
        trainer = DPOTrainer(policy, ref_model=ref.double(), args=_args(tmp_path, layout=lay, logprob_chunk_size=5),
                             train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([data[i] for i in range(4)])
        trainer.compute_loss(trainer.model, batch).backward()
        grads[lay] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert grads["padded"].keys() == grads[layout].keys() and len(grads["padded"]) > 10
    for name, g in grads["padded"].items():
        assert g.abs().sum() > 0 or "embed" in name
        where = f"{layout}, {name}"
        torch.testing.assert_close(grads[layout][name], g, atol=1e-7, rtol=1e-5, msg=lambda m, where=where: f"{where}: {m}")


def test_same_loss_as_trl_dpo_trainer_on_the_same_batch(tmp_path, tok, data):
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    # float64 on both sides, so the comparison measures the loss, not float32 summation order
    policy, ref = build_tiny_llama(tok, seed=1).double(), build_tiny_llama(tok, seed=2).double()
    rows = [{k: data[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(4)]
    # (TRL 1.16's sigmoid ignores label_smoothing; ours applies the cDPO form, so that case is not compared)
    for loss_type, extra in [("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.1})]:
        trl_args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True,
                             gradient_checkpointing=False, loss_type=[loss_type], beta=0.2, max_length=None, **extra)
        trl = TRLTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=trl_args,
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
        trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(rows)
        trl.model.eval()
        with torch.no_grad():
            theirs = trl.compute_loss(trl.model, trl_batch).item()

        ours_trainer = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                                  args=_args(tmp_path, loss_type=loss_type, beta=0.2, **extra),
                                  train_dataset=data, processing_class=tok)
        ours_trainer.model.eval()
        with torch.no_grad():
            ours = ours_trainer.compute_loss(ours_trainer.model, PairwiseCollator(tok.pad_token_id)(rows)).item()
        assert ours == pytest.approx(theirs, abs=1e-6), (loss_type, extra)


def _trained_params(tmp_path, tok, data, bs, ga):
    model = build_tiny_llama(tok, seed=5)
    args = _args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd",
                 learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.5)
    trainer = DPOTrainer(model, ref_model=build_tiny_llama(tok, seed=6), args=args, train_dataset=data,
                         processing_class=tok)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_is_exact(tmp_path, tok, data):
    one = _trained_params(tmp_path, tok, data, bs=4, ga=1)
    four = _trained_params(tmp_path, tok, data, bs=1, ga=4)
    start = build_tiny_llama(tok, seed=5).state_dict()
    moved = 0
    for name, value in one.items():
        torch.testing.assert_close(four[name], value, atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(value, start[name]))
    assert moved > 0


def test_lora_trains_only_the_adapter_and_reloads_identically(tmp_path, tok, data):
    model = build_tiny_llama(tok, seed=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, max_steps=8, learning_rate=5e-2, per_device_train_batch_size=4, beta=0.5)
    trainer = DPOTrainer(model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    batch = trainer.data_collator([data[i] for i in range(4)])
    with torch.no_grad():
        start_loss = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        end_loss = trainer.compute_loss(trainer.model, batch).item()
    assert end_loss < start_loss - 0.05

    changed = {n for n, p in trainer.model.named_parameters() if "lora_" in n
               and not torch.equal(p, torch.zeros_like(p)) and p.requires_grad}
    assert changed, "LoRA weights should have moved"
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), before[base_name]), name

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(build_tiny_llama(tok, seed=7), str(tmp_path / "adapter"))
    ids = torch.tensor([data[0]["prompt_ids"] + data[0]["chosen_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_adapter_off_reference_equals_explicit_base_copy(tmp_path, tok, data):
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    base = build_tiny_llama(tok, seed=8)
    t1 = DPOTrainer(copy.deepcopy(base), args=_args(tmp_path), train_dataset=data, processing_class=tok, peft_config=lora)
    t2 = DPOTrainer(copy.deepcopy(base), ref_model=copy.deepcopy(base), args=_args(tmp_path), train_dataset=data,
                    processing_class=tok, peft_config=lora)
    batch = t1.data_collator([data[i] for i in range(4)])
    r1 = t1.reference.seq_logps(t1.model, batch)
    r2 = t2.reference.seq_logps(t2.model, batch)
    torch.testing.assert_close(r1, r2)


def test_precomputed_reference_is_cached_and_matches(tmp_path, tok, data, monkeypatch):
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    live = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=_args(tmp_path), train_dataset=data,
                      processing_class=tok)
    cache = tmp_path / "cache"
    pre = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                     args=_args(tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(cache)),
                     train_dataset=data, processing_class=tok)
    assert "ref_logps" in pre.train_dataset.column_names
    assert len(list(cache.glob("*.safetensors"))) == 1
    rows = [pre.train_dataset[i] for i in range(4)]
    with torch.no_grad():
        l_pre = pre.compute_loss(pre.model, pre.data_collator(rows)).item()
        l_live = live.compute_loss(live.model, live.data_collator([data[i] for i in range(4)])).item()
    assert l_pre == pytest.approx(l_live, abs=1e-5)

    # a second trainer with the same model and data reads the file instead of running the reference
    import hfrlhf.trainers.reference as reference

    def refuse(*a, **k):
        raise AssertionError("the reference model should not run when the cache exists")

    monkeypatch.setattr(reference, "batch_logprobs", refuse)
    again = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                       args=_args(tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(cache)),
                       train_dataset=data, processing_class=tok)
    assert again.train_dataset["ref_logps"] == pre.train_dataset["ref_logps"]


def test_logged_metric_names_match_trl(tmp_path, tok, data):
    trainer = DPOTrainer(build_tiny_llama(tok), ref_model=build_tiny_llama(tok, seed=3), args=_args(tmp_path),
                         train_dataset=data, processing_class=tok)
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "kl", "loss"):
        assert name in logged, name
    assert logged["rewards/margins"] == pytest.approx(logged["rewards/chosen"] - logged["rewards/rejected"], abs=1e-6)


def test_unknown_loss_and_bad_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match="unknown preference loss_type 'dpo2'"):
        _args(tmp_path, loss_type="dpo2")
    with pytest.raises(ValueError, match="label_smoothing"):
        _args(tmp_path, label_smoothing=0.7)
    with pytest.raises(ValueError, match="max_prompt_length"):
        _args(tmp_path, max_length=64, max_prompt_length=64)


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True])
def test_bundled_smollm2_lora_and_qlora(tmp_path, four_bit):
    """On the real model: the loss falls on a repeated batch, only LoRA weights move, the adapter reloads."""
    from hfrlhf.data.formats import EXAMPLES_DIR, load
    from hfrlhf.models.loading import ModelArguments, load_causal_lm, load_tokenizer

    margs = ModelArguments(use_peft=True, load_in_4bit=four_bit, lora_r=8, lora_dropout=0.0)
    tok = load_tokenizer(margs.model_name_or_path)
    model = load_causal_lm(margs)
    rows = load(EXAMPLES_DIR / "demo_pairwise.jsonl").select(range(4))
    args = _args(tmp_path, max_steps=4, learning_rate=2e-3, beta=0.1, max_length=128)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    trainer = DPOTrainer(model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora)
    # packed 4-bit weights may be re-laid out by the CPU kernels on first use; float weights must not move
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if "lora_" not in n and p.dtype.is_floating_point}
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
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if not four_bit:
        reloaded = PeftModel.from_pretrained(load_causal_lm(ModelArguments()), str(tmp_path / "adapter")).eval()
        ids = batch["input_ids"][:1]
        # the accelerator may wrap forward in autocast; compare the plain module
        trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits,
                                       atol=1e-4, rtol=1e-4)


def _hand_losses(policy, ref, data, per_pair):
    out = []
    for row in data:
        pc = _seq_logp(policy, row["prompt_ids"], row["chosen_ids"])
        pr = _seq_logp(policy, row["prompt_ids"], row["rejected_ids"])
        rc = _seq_logp(ref, row["prompt_ids"], row["chosen_ids"])
        rr = _seq_logp(ref, row["prompt_ids"], row["rejected_ids"])
        out.append(per_pair(pc - rc, pr - rr))
    return sum(out) / len(out)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def _discopop(h_w, h_l, beta=0.3, tau=0.2):  # Lu et al. 2024, eq. 5
    z = beta * (h_w - h_l)
    w = 1 / (1 + math.exp(-z / tau))
    return (1 - w) * -_log_sigmoid(z) + w * math.exp(-z)


def _alpha_sigmoid(h_w, h_l, beta=0.3, a=0.3):  # f-DPO with f'(u) = (u^(a-1) - 1) / (a - 1), u = exp(h)
    def f(h):
        return (math.exp((a - 1) * h) - 1) / (a - 1)
    return -_log_sigmoid(beta * (f(h_w) - f(h_l)))


@pytest.mark.parametrize("fields,per_pair", [
    ({"loss_type": "discopop", "discopop_tau": 0.2}, _discopop),
    ({"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, _alpha_sigmoid),
], ids=["discopop_tau", "alpha_divergence"])
def test_trl_loss_fields_reach_the_loss_and_loss_kwargs_is_an_alias(tmp_path, tok, data, fields, per_pair):
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    loss_type = fields.pop("loss_type")
    with pytest.warns(FutureWarning, match="loss_kwargs is deprecated"):
        old = _args(tmp_path, beta=0.3, loss_type=loss_type, loss_kwargs=dict(fields))
    new = _args(tmp_path, beta=0.3, loss_type=loss_type, **fields)
    assert all(getattr(old, k) == v for k, v in fields.items()) and old.loss_kwargs is None
    losses = []
    for args in (new, old):
        trainer = DPOTrainer(policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, trainer.data_collator(list(data))).item())
    expected = _hand_losses(policy, ref, data, per_pair)
    assert losses[0] == pytest.approx(expected, abs=1e-5)
    assert losses[1] == losses[0]


def test_trl_loss_fields_have_trl_names_and_defaults():
    import dataclasses

    from trl import DPOConfig as TRLDPOConfig

    ours = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(TRLDPOConfig)}
    for name in ("discopop_tau", "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing", "beta"):
        assert ours[name] == theirs[name], name


def test_loss_settings_are_checked_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"'exo_pair' needs DPOConfig.label_smoothing > 0"):
        _args(tmp_path, loss_type="exo_pair")
    assert _args(tmp_path, loss_type="exo_pair", label_smoothing=1e-3).label_smoothing == 1e-3
    with pytest.raises(ValueError, match="rdpo has no f-divergence generalisation"):
        _args(tmp_path, loss_type=["sigmoid", "rdpo"], f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="the listwise"):
        _args(tmp_path, loss_type="lipo", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="reference-free"):
        _args(tmp_path, loss_type="simpo", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        _args(tmp_path, f_divergence_type="kl")
    with pytest.raises(ValueError, match="discopop_tau must be positive"):
        _args(tmp_path, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"loss_kwargs has keys no loss takes: \['tau'\]"):
        _args(tmp_path, loss_kwargs={"tau": 0.1})
    with pytest.raises(ValueError, match="disagree; set only DPOConfig.discopop_tau"):
        _args(tmp_path, discopop_tau=0.3, loss_kwargs={"discopop_tau": 0.2})
    for name in ("rpo_alpha", "cpo_alpha"):  # an NLL weight below 0 would train the chosen answers away
        with pytest.raises(ValueError, match=f"{name} must be at least 0 .*got -0.5"):
            _args(tmp_path, **{name: -0.5})
        assert getattr(_args(tmp_path, **{name: 0.0}), name) == 0.0
    # the sft term of a mix ignores the divergence (as in TRL): accepted
    assert _args(tmp_path, loss_type=["sigmoid", "sft"], f_divergence_type="js_divergence").f_divergence_type


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tok, data):
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    policy.config.pad_token_id = None
    trainer = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path), train_dataset=data, processing_class=no_pad)
    assert no_pad.pad_token_id == tok.eos_token_id and policy.config.pad_token_id == tok.eos_token_id
    batch = trainer.data_collator(list(data))
    assert (batch["input_ids"] == tok.eos_token_id).any()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    # padding is never scored: the same loss as with a pad token distinct from EOS
    other = copy.deepcopy(tok)
    other.pad_token = other.convert_ids_to_tokens(0)
    assert other.pad_token_id != tok.eos_token_id
    reference = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path), train_dataset=data, processing_class=other)
    with torch.no_grad():
        assert loss == pytest.approx(reference.compute_loss(reference.model, reference.data_collator(list(data))).item(),
                                     abs=1e-6)


@pytest.mark.parametrize("layout,capacity", [("padded", None), ("shared_prompt", None), ("shared_prompt", 256)])
def test_lora_fast_paths_give_the_plain_gradients(tmp_path, tok, data, monkeypatch, layout, capacity):
    # LoRA with the adapter-off reference, float64 (RMSNorm rounds through float32, hence not 1e-12): the fused LoRA layers and the frozen head's gradient
    # finished in forward (and, for shared_prompt, the layout and its row packing) against the plain path:
    # peft's own LoRA forward, in the padded layout
    import hfrlhf.ops.logprobs as logprobs
    from hfrlhf.ops.lora import fused_lora

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    base = build_tiny_llama(tok, seed=1).double()
    results = {}
    for name, lay, cap, fused in (("plain", "padded", None, False), ("fast", layout, capacity, True)):
        monkeypatch.setattr(logprobs, "fused_lora", fused_lora if fused else _no_fusion)
        torch.manual_seed(0)  # the same random (non-zero) adapter weights in both runs
        trainer = DPOTrainer(copy.deepcopy(base), args=_args(tmp_path, layout=lay, max_tokens_per_row=cap),
                             train_dataset=data, processing_class=tok, peft_config=lora)
        batch = trainer.data_collator([data[i] for i in range(4)])
        if cap is not None:
            assert batch["input_ids"].shape[0] < 4  # several prompts share a row
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[name] = (loss.item(), grads)
    (plain_loss, plain), (fast_loss, fast) = results["plain"], results["fast"]
    assert fast_loss == pytest.approx(plain_loss, abs=1e-9)
    assert fast.keys() == plain.keys() and len(plain) > 10 and all("lora" in n for n in plain)
    for n, g in plain.items():
        torch.testing.assert_close(fast[n], g, atol=1e-7, rtol=1e-5, msg=n)


def _no_fusion(model):
    """Stands in for ``fused_lora``: peft's own LoRA forward everywhere (no layer fused)."""
    return contextlib.nullcontext(0)


def test_end_training_in_one_process_keeps_the_trained_model_usable(tmp_path, tok, data):
    trainer = DPOTrainer(build_tiny_llama(tok, seed=5), ref_model=build_tiny_llama(tok, seed=6),
                         args=_args(tmp_path, learning_rate=1e-2), train_dataset=data, processing_class=tok)
    trainer.train()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.end_training()
    assert trainer.model_wrapped is trainer.model and trainer.accelerator._models == []
    assert not torch.distributed.is_initialized()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = type(trainer.model).from_pretrained(str(tmp_path / "saved"))
    for name, value in reloaded.named_parameters():
        torch.testing.assert_close(value, trained[name])
    metrics = trainer.evaluate(eval_dataset=data)  # evaluation still runs after end_training
    assert math.isfinite(metrics["eval_loss"])


def test_fresh_adapter_depends_on_the_seed_alone_not_on_what_ran_before(tmp_path, tok, data):
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    base = build_tiny_llama(tok, seed=8)
    assert_adapter_depends_on_seed_alone(lambda seed: DPOTrainer(
        copy.deepcopy(base), args=_args(tmp_path, seed=seed), train_dataset=data, processing_class=tok,
        peft_config=lora))


def test_rpo_alpha_adds_the_chosen_nll_per_token_by_hand(tmp_path, tok, data):
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    trainer = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path, beta=0.3, rpo_alpha=0.7), train_dataset=data,
                         processing_class=tok)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(list(data))).item()
    dpo = _hand_losses(policy, ref, data, lambda chosen, rejected: -_log_sigmoid(0.3 * (chosen - rejected)))
    nll = sum(-_seq_logp(policy, r["prompt_ids"], r["chosen_ids"]) / len(r["chosen_ids"]) for r in data) / len(data)
    assert nll > 0.1  # a term large enough to be seen
    assert loss == pytest.approx(dpo + 0.7 * nll, abs=1e-5)


LISTS = [
    {"prompt": "Describe the weather.", "responses": [" Grey and wet.", " Sunny, warm and bright!", " Fine."],
     "scores": [0.2, 0.9, 0.5]},
    {"prompt": "Rate the film.", "responses": [" Awful.", " A masterpiece."], "scores": [0.0, 1.0]},
    {"prompt": "How was lunch?", "responses": [" Tasty soup.", " Cold and bland.", " Lovely.", " Okay."],
     "scores": [0.8, 0.1, 0.8, 0.4]},
]


def test_listwise_rpo_alpha_adds_the_best_responses_nll_by_hand(tmp_path, tok):
    """PRO (Plackett-Luce over beta * h in score order) plus rpo_alpha times the best response's NLL per token,
    both from plain forwards; in the third list two responses tie for best and the first one is the chosen."""
    data = tokenize_dataset(Dataset.from_list(LISTS), tok, max_length=64)
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    losses = {}
    for alpha in (None, 0.5):
        trainer = DPOTrainer(policy, ref_model=ref, args=_args(tmp_path, beta=0.3, loss_type="pro", rpo_alpha=alpha),
                             train_dataset=data, processing_class=tok)
        with torch.no_grad():
            losses[alpha] = trainer.compute_loss(trainer.model, trainer.data_collator(list(data))).item()
    pro, nll = [], []
    for row in data:
        p, scores = row["prompt_ids"], row["scores"]
        logp = [_seq_logp(policy, p, ids) for ids in row["responses_ids"]]
        r = [0.3 * (lp - _seq_logp(ref, p, ids)) for lp, ids in zip(logp, row["responses_ids"])]
        # each response with something scored below it: -r_k + log sum over responses scored at most s_k (with
        # ties, Breslow's rule: tied responses are in each other's denominators)
        terms = sum(-r[k] + math.log(sum(math.exp(r[m]) for m in range(len(r)) if scores[m] <= scores[k]))
                    for k in range(len(r)) if min(scores) < scores[k])
        pro.append(terms)
        best = max(range(len(r)), key=lambda k: (scores[k], -k))
        nll.append(-logp[best] / len(row["responses_ids"][best]))
    assert losses[0.5] - losses[None] == pytest.approx(0.5 * sum(nll) / len(nll), abs=1e-5)
    assert losses[None] == pytest.approx(sum(pro) / len(pro), abs=1e-5)


def test_text_rows_are_refused_naming_the_trainer_that_takes_them(tmp_path, tok):
    with pytest.raises(ValueError, match=r"got text data .*language-modeling rows .* only SFTTrainer \(hfrlhf sft\)"):
        DPOTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=[{"text": "Hello there."}],
                   processing_class=tok)
