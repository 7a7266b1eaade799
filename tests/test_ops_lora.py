import contextlib

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
        with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in bf16, as peft's layer is there
            assert _uses_fused(layer, x) and layer(x).dtype == torch.bfloat16
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


def _relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def test_autocast_layer_is_at_least_as_close_to_float64_as_peft():
    """Under bf16 autocast both paths compute in bf16; measured against float64 evaluations of the same function
    on the same bf16-rounded inputs, the fused layer's output and gradients are as close as peft's (it rounds
    once where peft rounds three times) and within bf16 precision."""
    model = _lora_model(torch.float32)
    layer = _first_lora_layer(model)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 9, layer.base_layer.in_features, generator=g)
    upstream = torch.randn(4, 9, layer.base_layer.out_features, generator=g)
    name = layer.active_adapters[0]
    a, bb = layer.lora_A[name].weight, layer.lora_B[name].weight
    s = float(layer.scaling[name])

    def run(fused):
        x = x0.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        ctx = fused_lora(model) if fused else contextlib.nullcontext()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            assert _uses_fused(layer, x) == fused
        (out.float() * upstream).sum().backward()
        return out.detach(), x.grad, a.grad, bb.grad

    # float64 evaluation of the function on bf16-rounded inputs (what both paths start from)
    r = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (x0, layer.base_layer.weight, a, bb)]
    ref = _by_hand(r[0], r[1], None, r[2], r[3], s)
    (ref * upstream.to(torch.bfloat16).double()).sum().backward()
    reference = (ref.detach(), r[0].grad, r[2].grad, r[3].grad)
    fused, plain = run(True), run(False)
    for label, mine, theirs, exact in zip(("output", "grad x", "grad A", "grad B"), fused, plain, reference):
        err_fused, err_plain = _relative_error(mine, exact), _relative_error(theirs, exact)
        assert err_fused < 2e-2, (label, err_fused)
        assert err_fused <= 1.1 * err_plain + 1e-4, (label, err_fused, err_plain)


def test_autocast_whole_model_is_close_to_peft():
    model = _lora_model(torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain = _loss_and_grads(model, ids)
        with fused_lora(model) as switched:
            fused_loss, fused = _loss_and_grads(model, ids)
    assert switched > 0 and fused.keys() == plain.keys() and len(plain) == 2 * switched
    torch.testing.assert_close(fused_loss, plain_loss, atol=0, rtol=2e-2)
    for name in plain:
        assert _relative_error(fused[name], plain[name].double()) < 5e-2, name


def test_cast_cache_reuses_one_cast_per_input_and_version():
    from hfrlhf.ops.lora import _CastCache

    cache = _CastCache()
    x = torch.randn(3, 4, requires_grad=True)
    first = cache.get(x, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and cache.get(x, torch.bfloat16) is first
    assert cache.get(x.detach().clone(), torch.bfloat16) is not first  # another tensor
    assert cache.get(first, torch.bfloat16) is first  # already in the dtype: itself
    cache.get(x, torch.bfloat16)
    with torch.no_grad():
        no_grad = cache.get(x, torch.bfloat16)
        assert no_grad is not first and no_grad.grad_fn is None
    y = torch.randn(3, 4)
    before = cache.get(y, torch.bfloat16)
    y.add_(1.0)  # changed in place: a new cast
    after = cache.get(y, torch.bfloat16)
    assert after is not before and torch.equal(after, y.to(torch.bfloat16))


def test_autocast_reference_pass_is_exactly_the_base_model():
    """Adapters off under autocast (a reference pass): the same numbers as peft's forward, bit for bit, with the
    inputs shared by several layers cast once."""
    model = _lora_model(torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), model.disable_adapter():
        plain = model(input_ids=ids).logits
        with fused_lora(model):
            fused = model(input_ids=ids).logits
            layer = _first_lora_layer(model)
            x = torch.randn(3, layer.base_layer.in_features)
            assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.equal(fused, plain)
