import contextlib

import torch
from peft import LoraConfig, get_peft_model

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops import casts, rollout
from hfrlhf.ops.casts import cast_weight, shared_weight_casts
from hfrlhf.ops.logprobs import batch_logprobs
from hfrlhf.ops.rollout import generate_with_logprobs, make_generation_config


def _model(layers_with_lora=(1,)):
    tok = build_tiny_tokenizer()
    # LoRA on some decoder layers only: the others' linear layers (and the head) are plain frozen nn.Linear
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                        layers_to_transform=list(layers_with_lora))
    model = get_peft_model(build_tiny_llama(tok, seed=5), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, tok


def _batch(tok):
    ids = torch.tensor([tok.encode("hello there, how are you today") + tok.encode(" fine thanks")])
    n = ids.shape[1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(n)[None],
            "pred_index": torch.arange(3, n - 1), "target_index": torch.arange(4, n),
            "target_seq": torch.zeros(n - 4, dtype=torch.long), "last_index": torch.tensor([n - 1])}


def _count_casts(monkeypatch, tensors):
    """Counts of ``.to(torch.bfloat16)`` calls on each of ``tensors`` (by position)."""
    index = {id(t): i for i, t in enumerate(tensors)}
    counts = [0] * len(tensors)
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if id(self) in index and torch.bfloat16 in args:
            counts[index[id(self)]] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    return counts


def test_cast_weight_shares_copies_of_frozen_weights_only_inside_the_scope():
    frozen, trained = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    assert cast_weight(frozen, torch.bfloat16) is not cast_weight(frozen, torch.bfloat16)  # no scope: no sharing
    with shared_weight_casts():
        first = cast_weight(frozen, torch.bfloat16)
        assert cast_weight(frozen, torch.bfloat16) is first
        assert torch.equal(first, frozen.to(torch.bfloat16))
        assert cast_weight(trained, torch.bfloat16) is not cast_weight(trained, torch.bfloat16)  # changes every step
        assert cast_weight(frozen, torch.float32) is frozen
        with torch.no_grad():
            frozen.add_(1.0)  # changed in place: the version counter moves, a new copy is made
        assert torch.equal(cast_weight(frozen, torch.bfloat16), frozen.to(torch.bfloat16))
    assert casts._scope is None


def test_two_forwards_in_one_scope_give_the_same_bits_with_each_frozen_weight_cast_once(monkeypatch):
    # a DPO step's shape: policy forward with grad, then the adapter-off reference forward, under bf16 autocast
    model, tok = _model()
    batch = _batch(tok)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            policy = batch_logprobs(model, batch).seq_logps
            with torch.no_grad(), model.disable_adapter():
                ref = batch_logprobs(model, batch).seq_logps
        policy.sum().backward()
        return [policy.detach(), ref] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    frozen = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    counts = _count_casts(monkeypatch, frozen)
    plain = step()
    assert max(counts) == 2  # without the scope: the head's weight is cast by the policy and the reference pass
    counts[:] = [0] * len(frozen)
    with shared_weight_casts():
        shared = step()
    assert counts == [1] * len(frozen)  # every frozen linear weight, with or without LoRA: once for both passes
    assert len(plain) == len(shared) > 2
    for a, b in zip(plain, shared):
        assert torch.equal(a, b)


def test_sampling_casts_frozen_weights_once_and_samples_the_same_tokens_and_log_probs(monkeypatch):
    model, tok = _model(layers_with_lora=(0,))
    model.eval()
    prompt = torch.tensor([tok.encode("tell me something")])
    mask = torch.ones_like(prompt)
    config = make_generation_config(max_new_tokens=6, temperature=1.0, top_k=None, top_p=1.0, stop_token_ids=[],
                                    pad_token_id=tok.pad_token_id)
    calls = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):  # bf16 copies of frozen weights made during sampling
        out = real_to(self, *args, **kwargs)
        if isinstance(self, torch.nn.Parameter) and out.dtype == torch.bfloat16 and not self.requires_grad:
            calls.append(id(self))
        return out

    def sample():
        calls.clear()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generate_with_logprobs(model, prompt, mask, config)

    ids, logps = sample()  # the library's path: each frozen linear weight cast once for the call
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    ids, logps = sample()
    cached_calls = list(calls)
    monkeypatch.setattr(rollout, "_sampling_casts", lambda model: contextlib.nullcontext())
    ids2, logps2 = sample()  # autocast's own casts, at every token
    assert torch.equal(ids, ids2) and torch.equal(logps, logps2)
    frozen = {id(m.weight) for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    assert len(frozen) > 2 and sorted(cached_calls) == sorted(frozen)  # each frozen weight once, for all 6 tokens
    assert all("forward" not in m.__dict__ for m in model.modules())  # own forwards back
