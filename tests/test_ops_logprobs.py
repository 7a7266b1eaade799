import pytest
import torch

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops import logprobs
from hfrlhf.ops.logprobs import batch_logprobs, linear_logprob, token_entropy


def _reference(h, w, t, temperature=1.0):
    return torch.log_softmax((h @ w.T) / temperature, -1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("row_block_bytes", [None, 2 * 13 * 8])
@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_linear_logprob_matches_full_softmax_and_its_gradients(chunk, temperature, frozen_head, row_block_bytes,
                                                                monkeypatch):
    # frozen_head: the gradient for hidden is finished in forward (no recomputation in backward);
    # row_block_bytes: the softmax passes walk two rows of a chunk at a time instead of the whole chunk
    if row_block_bytes is not None:
        monkeypatch.setattr(logprobs, "_ROW_BLOCK_BYTES", row_block_bytes)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    t = torch.randint(0, 13, (7,), generator=g)
    upstream = torch.randn(7, generator=g, dtype=torch.float64)

    ours = linear_logprob(h, w, t, chunk_size=chunk, temperature=temperature)
    (ours.double() * upstream).sum().backward()
    gh = h.grad.clone()
    gw = None if frozen_head else w.grad.clone()
    h.grad = w.grad = None
    ref = _reference(h, w, t, temperature)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(gh, h.grad, atol=1e-6, rtol=0)
    if not frozen_head:
        torch.testing.assert_close(gw, w.grad, atol=1e-6, rtol=0)


def test_frozen_head_gradient_in_float32_matches_full_softmax():
    # the fp32 path the trainers take under LoRA, against float64 autograd through a full softmax
    g = torch.Generator().manual_seed(4)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g) / 4
    t = torch.randint(0, 300, (40,), generator=g)
    upstream = torch.randn(40, generator=g)
    ours = linear_logprob(h, w, t, chunk_size=16)
    (ours * upstream).sum().backward()
    h64 = h.detach().double().requires_grad_()
    ref = _reference(h64, w.double(), t)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)


def test_linear_logprob_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 5, 2, 2])
    assert torch.autograd.gradcheck(lambda a, b: linear_logprob(a, b, t, chunk_size=3).double(), (h, w))


def test_frozen_head_gets_no_gradient():
    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(9, 4)
    linear_logprob(h, w, torch.tensor([1, 2, 3])).sum().backward()
    assert h.grad is not None and w.grad is None


def test_bf16_autocast_is_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(16, 32, generator=g), torch.randn(50, 32, generator=g)
    t = torch.randint(0, 50, (16,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_logprob(h, w, t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, _reference(h, w, t), atol=0.15, rtol=0.02)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_row_blocks_give_the_same_bits_under_bf16_autocast(frozen_head, monkeypatch):
    # bf16 logits, float32 softmax: walking a chunk a few rows at a time changes no arithmetic of any row
    g = torch.Generator().manual_seed(3)
    h = torch.randn(21, 32, generator=g, requires_grad=True)
    w = (torch.randn(500, 32, generator=g) / 4).requires_grad_(not frozen_head)
    t = torch.randint(0, 500, (21,), generator=g)
    upstream = torch.randn(21, generator=g)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear_logprob(h, w, t, chunk_size=8, temperature=0.8)
        grads = torch.autograd.grad((out * upstream).sum(), [h] if frozen_head else [h, w])
        return [out.detach(), *grads]

    whole = run()
    monkeypatch.setattr(logprobs, "_ROW_BLOCK_BYTES", 3 * 500 * 4)  # three float32 rows per block
    for a, b in zip(whole, run()):
        assert torch.equal(a, b)


def test_token_entropy_matches_definition():
    h, w = torch.randn(5, 4), torch.randn(7, 4)
    p = torch.softmax(h @ w.T, -1)
    torch.testing.assert_close(token_entropy(h, w, chunk_size=2), -(p * p.log()).sum(-1))
    assert torch.all(token_entropy(h, w) <= torch.log(torch.tensor(7.0)) + 1e-6)


def test_batch_logprobs_equals_full_logits_on_a_padded_batch():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=3)
    # two sequences, right padded: prompt lengths 3 and 2, completion lengths 2 and 3
    ids = torch.tensor([[5, 6, 7, 8, 9, 2], [10, 11, 12, 13, 14, 2]])
    ids[0, 5] = tok.pad_token_id
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    # scored tokens: row 0 positions 3,4 ; row 1 positions 2,3,4,5 (pad == eos at 5 is real)
    target_index = torch.tensor([3, 4, 6 + 2, 6 + 3, 6 + 4, 6 + 5])
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": torch.arange(6).expand(2, 6),
        "pred_index": target_index - 1,
        "target_index": target_index,
        "target_seq": torch.tensor([0, 0, 1, 1, 1, 1]),
        "last_index": torch.tensor([4, 11]),
    }
    out = batch_logprobs(model, batch, chunk_size=2, return_last_hidden=True)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits, -1)
    expected0 = logp[0, 2, 8] + logp[0, 3, 9]
    expected1 = logp[1, 1, 12] + logp[1, 2, 13] + logp[1, 3, 14] + logp[1, 4, 2]
    torch.testing.assert_close(out.seq_logps, torch.stack([expected0, expected1]).detach(), atol=1e-5, rtol=0)
    assert out.seq_lens.tolist() == [2.0, 4.0]
    assert out.last_hidden.shape == (2, model.config.hidden_size)


def test_sequence_sums_are_accumulated_in_float64():
    # 2000 scored tokens in one sequence: a float32 running sum drifts by ~1e-5 relative; the float64 sum
    # rounded once to float32 is what the per-sequence log-prob must be
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=4)
    g = torch.Generator().manual_seed(4)
    T = 2001
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=g)
    target_index = torch.arange(1, T)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(1, T, dtype=torch.long),
        "position_ids": torch.arange(T)[None],
        "pred_index": target_index - 1,
        "target_index": target_index,
        "target_seq": torch.zeros(T - 1, dtype=torch.long),
        "last_index": torch.tensor([T - 1]),
    }
    with torch.no_grad():
        out = batch_logprobs(model, batch, chunk_size=512)
    assert out.token_logps.dtype == out.seq_logps.dtype == torch.float32
    exact = out.token_logps.double().sum().float()
    assert out.seq_logps[0].item() == exact.item()
    assert out.seq_lens.tolist() == [T - 1.0]
