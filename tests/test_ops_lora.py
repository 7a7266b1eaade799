import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops.lora import LoraLinear, fused_lora


def _by_hand(x, w, b, a, bb, s):
    # the LoRA definition written out: base, plus scaling times the rank-r path
    y = x @ w.T + (b if b is not None else 0)
    return y + s * ((x @ a.T) @ bb.T)


@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_values_and_every_gradient_match_the_definition(with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    a = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    params = [t for t in (x, w, b, a, bb) if t is not None]

    ours = LoraLinear.apply(x, w, b, a, bb, 1.5)
    ours_grads = torch.autograd.grad((ours * upstream).sum(), params)
    ref = _by_hand(x, w, b, a, bb, 1.5)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)

    assert ours.shape == (2, 5, 6)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    for mine, theirs in zip(ours_grads, ref_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0)


def test_lora_linear_gradcheck():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a, bb = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, a, bb)]
    assert torch.autograd.gradcheck(lambda x, w, a, bb: LoraLinear.apply(x, w, None, a, bb, 0.5), inputs)


def _lora_model(dtype=torch.float64, **lora):
    tok = build_tiny_tokenizer()
    model = get_peft_model(build_tiny_llama(tok, seed=3), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    model = model.to(dtype)
    with torch.no_grad():  # B starts at zero; make the adapter path count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    loss = out.double().logsumexp(-1).mean() + out[..., 3].double().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_whole_model_gives_peft_loss_and_gradients():
    model = _lora_model()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    plain_loss, plain = _loss_and_grads(model, ids)
    with fused_lora(model) as switched:
        fused_loss, fused = _loss_and_grads(model, ids)
    assert switched == sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert switched > 0 and fused.keys() == plain.keys() and len(plain) == 2 * switched
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-12, rtol=0)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-10, rtol=1e-10, msg=name)


def test_float32_model_is_close_to_peft():
    model = _lora_model(torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain_loss, plain = _loss_and_grads(model, ids)
    with fused_lora(model):
        fused_loss, fused = _loss_and_grads(model, ids)
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def _first_lora_layer(model):
    from peft.tuners.lora.layer import Linear

    return next(m for m in model.modules() if type(m) is Linear)


def _uses_fused(layer, x):
    return "LoraLinear" in type(layer(x).grad_fn).__name__


def test_falls_back_to_peft_where_the_fused_form_would_differ():
    model = _lora_model(torch.float32)
    layer = _first_lora_layer(model)
    x = torch.randn(2, 3, layer.base_layer.in_features, requires_grad=True)
    with fused_lora(model):
        assert _uses_fused(layer, x)
        with model.disable_adapter():  # the reference: base layer only
            assert "LoraLinear" not in type(layer(x).grad_fn).__name__
            torch.testing.assert_close(layer(x), layer.base_layer(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _uses_fused(layer, x)
    assert "forward" not in layer.__dict__  # peft's own forward is back


def test_active_dropout_keeps_peft_forward_and_inactive_dropout_is_fused():
    model = _lora_model(torch.float32, lora_dropout=0.5)
    layer = _first_lora_layer(model)
    x = torch.randn(2, 3, layer.base_layer.in_features, requires_grad=True)
    with fused_lora(model):
        model.train()
        assert not _uses_fused(layer, x)
        model.eval()
        assert _uses_fused(layer, x)


def test_gradient_checkpointing_keeps_peft_forward():
    model = _lora_model(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with fused_lora(model) as switched:
        assert switched == 0


def test_models_without_lora_are_untouched():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    with fused_lora(model) as switched:
        assert switched == 0
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))
