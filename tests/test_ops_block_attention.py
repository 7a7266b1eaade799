import pytest
import torch

from hfrlhf.data.collators import PairwiseCollator
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops.block_attention import blocked_attention

FEATS = [
    {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 2], "rejected_ids": [11, 2]},
    {"prompt_ids": [12], "chosen_ids": [13, 14, 15, 16, 2], "rejected_ids": [17, 18, 2]},
    {"prompt_ids": [19, 20], "chosen_ids": [2], "rejected_ids": [21, 22, 23, 24, 25, 26, 2]},
]


def _model(attn="sdpa"):
    model = build_tiny_llama(build_tiny_tokenizer(), seed=5).double()
    model.config._attn_implementation = attn
    return model


def _hidden_and_grads(model, batch, blocks):
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    inputs["attention_mask"] = inputs["attention_mask"].double()
    with blocked_attention(model, blocks) as on:
        hidden = model.model(**inputs).last_hidden_state
    real = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    real.view(-1)[batch["pred_index"]] = True
    real.view(-1)[batch["last_index"]] = True
    weights = torch.linspace(-1, 1, hidden.shape[-1], dtype=hidden.dtype)
    (hidden[real] * weights).sum().backward()  # a loss on real tokens only, as every trainer's
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return on, hidden[real].detach(), grads


@pytest.mark.parametrize("layout,capacity", [("shared_prompt", None), ("shared_prompt", 64), ("packed", 30)])
def test_blocks_give_the_masked_attention_and_its_gradients(layout, capacity):
    model = _model()
    batch = PairwiseCollator(2, layout=layout, max_tokens_per_row=capacity)(FEATS)
    off, masked, masked_grads = _hidden_and_grads(model, batch, None)
    on, blocked, blocked_grads = _hidden_and_grads(model, batch, batch["attention_blocks"])
    assert on and not off
    torch.testing.assert_close(blocked, masked, atol=1e-10, rtol=1e-10)
    assert blocked_grads.keys() == masked_grads.keys() and len(masked_grads) > 5
    for name, g in masked_grads.items():
        torch.testing.assert_close(blocked_grads[name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_eager_attention_and_checkpointing_keep_their_own_attention():
    batch = PairwiseCollator(2, layout="shared_prompt")(FEATS)
    eager = _model("eager")
    with blocked_attention(eager, batch["attention_blocks"]) as on:
        assert not on and eager.config._attn_implementation == "eager"
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with blocked_attention(model, batch["attention_blocks"]) as on:
        assert not on


def test_the_model_gets_sdpa_back_even_after_an_error():
    model = _model()
    batch = PairwiseCollator(2, layout="shared_prompt")(FEATS)
    with pytest.raises(RuntimeError, match="inside"):
        with blocked_attention(model, batch["attention_blocks"]) as on:
            assert on and model.config._attn_implementation != "sdpa"
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
