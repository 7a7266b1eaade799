"""Collators: exact tensors per layout, identical log-probs across layouts, random-batch consistency."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfrlhf.data.collators import (
    ListwiseCollator,
    PairwiseCollator,
    PointwiseCollator,
    PromptCollator,
    Segment,
    SFTCollator,
    UnpairedCollator,
    build_batch,
)
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.ops.logprobs import batch_logprobs

PAD = 2  # the same id as EOS, as with SmolLM2: masks must come from lengths, not from ids

PAIRS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2], "margin": 0.5},
    {"prompt_ids": [10], "chosen_ids": [11, 12, 2], "rejected_ids": [2], "margin": 1.5},
]
# sequences: 0 = [5,6,7,2]  1 = [10,11,12,2]  2 = [5,6,8,9,2]  3 = [10,2]


def allowed(mask4d: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) additive mask -> (R, T, T) bool of allowed (query, key) pairs."""
    return mask4d[:, 0] == 0


def allowed_from_lists(width: int, rows: list[dict[int, list[int]]]) -> torch.Tensor:
    out = torch.zeros(len(rows), width, width, dtype=torch.bool)
    for r, row in enumerate(rows):
        for q, keys in row.items():
            out[r, q, keys] = True
    return out


def test_pairwise_padded_right_exact():
    b = PairwiseCollator(PAD)(PAIRS)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2, 2], [10, 11, 12, 2, 2], [5, 6, 8, 9, 2], [10, 2, 2, 2, 2]]
    assert b["attention_mask"].dtype == torch.long
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
    assert b["target_index"].tolist() == [2, 3, 6, 7, 8, 12, 13, 14, 16]
    assert b["pred_index"].tolist() == [1, 2, 5, 6, 7, 11, 12, 13, 15]
    assert b["target_seq"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert b["last_index"].tolist() == [3, 8, 14, 16]
    assert b["margin"].tolist() == [0.5, 1.5]


def test_pairwise_padded_left_exact():
    b = PairwiseCollator(PAD, padding_side="left")(PAIRS)
    assert b["input_ids"].tolist() == [[2, 5, 6, 7, 2], [2, 10, 11, 12, 2], [5, 6, 8, 9, 2], [2, 2, 2, 10, 2]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    assert b["target_index"].tolist() == [3, 4, 7, 8, 9, 12, 13, 14, 19]
    assert b["pred_index"].tolist() == [2, 3, 6, 7, 8, 11, 12, 13, 18]
    assert b["last_index"].tolist() == [4, 9, 14, 19]


def test_pairwise_packed_exact():
    # first-fit decreasing into rows of 8: [seq 2 (5 tokens), seq 3 (2)] and [seq 0 (4), seq 1 (4)]
    b = PairwiseCollator(PAD, layout="packed", max_tokens_per_row=8)(PAIRS)
    assert b["input_ids"].tolist() == [[5, 6, 8, 9, 2, 10, 2, 2], [5, 6, 7, 2, 10, 11, 12, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert b["attention_mask"].shape == (2, 1, 8, 8)
    assert b["attention_mask"].dtype == torch.float32
    blocks = [
        {q: list(range(0, q + 1)) for q in range(5)} | {q: list(range(5, q + 1)) for q in (5, 6)} | {7: [7]},
        {q: list(range(0, q + 1)) for q in range(4)} | {q: list(range(4, q + 1)) for q in range(4, 8)},
    ]
    assert torch.equal(allowed(b["attention_mask"]), allowed_from_lists(8, blocks))
    assert set(b["attention_mask"].unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert b["target_index"].tolist() == [10, 11, 13, 14, 15, 2, 3, 4, 6]
    assert b["pred_index"].tolist() == [9, 10, 12, 13, 14, 1, 2, 3, 5]
    assert b["target_seq"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert b["last_index"].tolist() == [11, 15, 4, 6]


def test_pairwise_packed_default_row_is_longest_sequence():
    b = PairwiseCollator(PAD, layout="packed")(PAIRS)
    # capacity 5: seq 2 fills a row, seqs 0 and 1 (4 each) cannot share, seq 3 (2) fits nowhere else
    assert b["input_ids"].tolist() == [[5, 6, 8, 9, 2], [5, 6, 7, 2, 2], [10, 11, 12, 2, 2], [10, 2, 2, 2, 2]]


def test_pairwise_shared_prompt_exact():
    b = PairwiseCollator(PAD, layout="shared_prompt")(PAIRS)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2, 8, 9, 2], [10, 11, 12, 2, 2, 2, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 3, 1, 0, 0]]
    rows = [
        {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 4], 5: [0, 1, 4, 5], 6: [0, 1, 4, 5, 6]},
        {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 4], 5: [5], 6: [6]},
    ]
    assert torch.equal(allowed(b["attention_mask"]), allowed_from_lists(7, rows))
    assert b["target_index"].tolist() == [2, 3, 8, 9, 10, 4, 5, 6, 11]
    # the first rejected token of each row is predicted from the last prompt token (flat 1 and 7)
    assert b["pred_index"].tolist() == [1, 2, 7, 8, 9, 1, 4, 5, 7]
    assert b["target_seq"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert b["last_index"].tolist() == [3, 10, 6, 11]


def test_pad_to_multiple_of_and_mask_dtype():
    b = PairwiseCollator(PAD, layout="shared_prompt", pad_to_multiple_of=4, mask_dtype=torch.bfloat16)(PAIRS)
    assert b["input_ids"].shape == (2, 8)
    assert b["attention_mask"].dtype == torch.bfloat16
    assert b["attention_mask"][1, 0, 7].tolist() == [torch.finfo(torch.bfloat16).min] * 7 + [0.0]


def test_margin_must_be_all_or_none():
    with pytest.raises(ValueError, match="margin"):
        PairwiseCollator(PAD)([PAIRS[0], {k: v for k, v in PAIRS[1].items() if k != "margin"}])
    assert "margin" not in PairwiseCollator(PAD)([{k: v for k, v in PAIRS[0].items() if k != "margin"}])


def test_left_padding_only_for_padded_layout():
    with pytest.raises(ValueError, match="left"):
        PairwiseCollator(PAD, layout="packed", padding_side="left")
    with pytest.raises(ValueError, match="layout"):
        SFTCollator(PAD, layout="shared_prompt")  # type: ignore[arg-type]


def test_listwise_ragged_k_shared_prompt():
    feats = [
        {"prompt_ids": [5], "responses_ids": [[6, 2], [7, 2], [2]], "scores": [1.0, -1.0, 3.0]},
        {"prompt_ids": [9, 9], "responses_ids": [[6, 6, 2], [2]], "scores": [0.0, 2.0]},
    ]
    b = ListwiseCollator(PAD, layout="shared_prompt")(feats)
    assert b["input_ids"].tolist() == [[5, 6, 2, 7, 2, 2], [9, 9, 6, 6, 2, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 1, 2, 1], [0, 1, 2, 3, 4, 2]]
    assert b["response_seq"].tolist() == [[0, 1, 2], [3, 4, -1]]
    assert b["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["scores"].tolist() == [[1.0, -1.0, 3.0], [0.0, 2.0, 0.0]]
    assert b["target_index"].tolist() == [1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert b["pred_index"].tolist() == [0, 1, 0, 3, 0, 7, 8, 9, 7]
    assert b["target_seq"].tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 4]
    assert b["last_index"].tolist() == [2, 4, 5, 10, 11]


def test_unpaired_kl_pairs():
    feats = [
        {"prompt_ids": [5], "completion_ids": [6, 2], "label": True},
        {"prompt_ids": [7], "completion_ids": [8, 8, 2], "label": False},
        {"prompt_ids": [9, 9], "completion_ids": [2], "label": True},
    ]
    b = UnpairedCollator(PAD, kl_pairs=True)(feats)
    assert b["labels"].tolist() == [True, False, True]
    assert b["input_ids"].tolist() == [
        [5, 6, 2, 2],
        [7, 8, 8, 2],
        [9, 9, 2, 2],
        [5, 8, 8, 2],  # prompt 0 + completion 1
        [7, 2, 2, 2],  # prompt 1 + completion 2
        [9, 9, 6, 2],  # prompt 2 + completion 0
    ]
    assert b["last_index"].tolist() == [2, 7, 10, 15, 17, 23]
    shared = UnpairedCollator(PAD, kl_pairs=True, layout="shared_prompt")(feats)
    assert shared["input_ids"].tolist() == [[5, 6, 2, 8, 8, 2], [7, 8, 8, 2, 2, 2], [9, 9, 2, 6, 2, 2]]
    assert UnpairedCollator(PAD)(feats)["input_ids"].shape == (3, 4)


def test_unpaired_kl_pairs_single_record_pairs_with_itself():
    b = UnpairedCollator(PAD, kl_pairs=True)([{"prompt_ids": [5], "completion_ids": [6, 2], "label": False}])
    assert b["input_ids"].tolist() == [[5, 6, 2], [5, 6, 2]]
    assert b["target_seq"].tolist() == [0, 0, 1, 1]
    assert b["labels"].tolist() == [False]


def test_pointwise_scores():
    feats = [{"prompt_ids": [5], "completion_ids": [6, 2], "score": 0.25}, {"prompt_ids": [7], "completion_ids": [2], "score": -2}]
    b = PointwiseCollator(PAD)(feats)
    assert b["scores"].dtype == torch.float32 and b["scores"].tolist() == [0.25, -2.0]
    assert b["target_seq"].tolist() == [0, 0, 1]


def test_sft_labels_padded_and_packed():
    feats = [{"prompt_ids": [5, 6], "completion_ids": [7, 2]}, {"prompt_ids": [8], "completion_ids": [2]}]
    padded = SFTCollator(PAD)(feats)
    assert padded["labels"].tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]
    packed = SFTCollator(PAD, layout="packed", max_tokens_per_row=6)(feats)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 2, 8, 2]]
    assert packed["labels"].tolist() == [[-100, -100, 7, 2, -100, 2]]


def test_prompt_collator_left_pads():
    b = PromptCollator(PAD, pad_to_multiple_of=4)([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8]}])
    assert b["input_ids"].tolist() == [[2, 5, 6, 7], [2, 2, 2, 8]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert set(b) == {"input_ids", "attention_mask"}


def test_build_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="first segments differ"):
        build_batch([[Segment([1], False), Segment([2], True)], [Segment([3], False), Segment([2], True)]], 0,
                    layout="shared_prompt", groups=[0, 0])
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        build_batch([[Segment([1, 2, 3], True)]], 0, layout="packed", max_tokens_per_row=2)


# ---------------------------------------------------------------- the same numbers in every layout

def _model(attn: str) -> torch.nn.Module:
    model = build_tiny_llama(build_tiny_tokenizer(), seed=1)
    model.set_attn_implementation(attn)
    return model.float().eval()


def _seq_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_seqs: int) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = model(**inputs).logits  # (R, T, V)
    assert torch.isfinite(logits).all()
    rows, width, vocab = logits.shape
    logps = logits.view(rows * width, vocab)[batch["pred_index"]].log_softmax(-1)  # (N, V)
    token_logps = logps.gather(-1, batch["input_ids"].view(-1)[batch["target_index"]][:, None]).squeeze(-1)
    return torch.zeros(num_seqs).index_add_(0, batch["target_seq"], token_logps)


def _reference_logps(model: torch.nn.Module, prompts, completions) -> torch.Tensor:
    """Each sequence alone in a batch of one: no padding, no packing, plain causal attention."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0].log_softmax(-1)  # (L, V)
        out.append(sum(logps[len(p) + j - 1, t].item() for j, t in enumerate(c)))
    return torch.tensor(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_give_identical_logps(attn):
    tok = build_tiny_tokenizer()
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    gen = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(3, len(tok), (n,), generator=gen).tolist()

    lengths = [(7, 3, 9), (2, 11, 1), (12, 4, 6)]  # (prompt, chosen, rejected) before EOS
    feats = [{"prompt_ids": rand(p), "chosen_ids": rand(c) + [eos], "rejected_ids": rand(r) + [eos]} for p, c, r in lengths]
    prompts = [f["prompt_ids"] for f in feats] * 2
    completions = [f["chosen_ids"] for f in feats] + [f["rejected_ids"] for f in feats]
    model = _model(attn)
    expected = _reference_logps(model, prompts, completions)

    collators = {
        "padded_right": PairwiseCollator(eos),
        "padded_left": PairwiseCollator(eos, padding_side="left"),
        "packed": PairwiseCollator(eos, layout="packed", max_tokens_per_row=40),
        "shared_prompt": PairwiseCollator(eos, layout="shared_prompt", pad_to_multiple_of=8),
        "shared_prompt_packed": PairwiseCollator(eos, layout="shared_prompt", max_tokens_per_row=64),
    }
    for name, collator in collators.items():
        batch = collator(feats)
        if name == "packed":
            assert batch["input_ids"].shape[0] < 6  # several sequences share a row
        if name == "shared_prompt_packed":  # the three prompts with their completions (21, 16, 24 tokens): one row
            assert batch["input_ids"].shape == (1, 61)
        got = _seq_logps(model, batch, 6)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{name} with {attn}")
        with torch.no_grad():  # the trainers' path: with sdpa, the attention of attention_blocks
            fast = batch_logprobs(model, batch, chunk_size=4).seq_logps
        torch.testing.assert_close(fast, expected, atol=1e-5, rtol=0, msg=f"{name} with {attn}, batch_logprobs")
        assert batch["input_ids"].view(-1)[batch["last_index"]].tolist() == [eos] * 6, name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_listwise_shared_prompt_matches_reference(attn):
    feats = [
        {"prompt_ids": [40, 41, 42], "responses_ids": [[50, 2], [60, 61, 62, 2], [2]], "scores": [0.0, 1.0, 2.0]},
        {"prompt_ids": [70], "responses_ids": [[80, 81, 2], [90, 2]], "scores": [1.0, 0.0]},
    ]
    prompts = [f["prompt_ids"] for f in feats for _ in f["responses_ids"]]
    completions = [r for f in feats for r in f["responses_ids"]]
    model = _model(attn)
    expected = _reference_logps(model, prompts, completions)
    for layout in ("padded", "packed", "shared_prompt"):
        got = _seq_logps(model, ListwiseCollator(2, layout=layout)(feats), 5)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{layout} with {attn}")


def test_packed_pad_rows_stay_finite_when_mask_minimum_becomes_inf():
    # fp32's minimum overflows to -inf when the mask is cast to bf16; with eager attention a fully masked
    # pad query would then give NaN that spreads to real tokens through the next layer. Pads attend to
    # themselves, so no query is ever fully masked.
    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
             {"prompt_ids": [11], "chosen_ids": [12, 2], "rejected_ids": [13, 14, 15, 2]}]
    batch = PairwiseCollator(PAD, layout="packed", max_tokens_per_row=12)(feats)
    assert batch["input_ids"][-1, -1] == PAD and batch["position_ids"][-1, -1] == 0  # the last row has pads
    assert torch.tensor(torch.finfo(torch.float32).min).to(torch.bfloat16).isinf()
    inf_batch = dict(batch, attention_mask=batch["attention_mask"].masked_fill(batch["attention_mask"] != 0, float("-inf")))
    model = _model("eager")
    torch.testing.assert_close(_seq_logps(model, inf_batch, 4), _seq_logps(model, batch, 4), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- random batches: the index scheme holds

ids_list = st.lists(st.integers(3, 60), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(st.tuples(ids_list, ids_list, ids_list), min_size=1, max_size=4),
    layout=st.sampled_from(["padded", "packed", "shared_prompt"]),
    left=st.booleans(),
    multiple=st.sampled_from([None, 4]),
    capacity=st.sampled_from([None, 18, 40]),
)
def test_index_scheme_random_pairwise(records, layout, left, multiple, capacity):
    feats = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in records]
    side = "left" if left and layout == "padded" else "right"
    # a row capacity packs shared-prompt units (at most 18 tokens each here) several to a row
    capacity = capacity if layout == "shared_prompt" else None
    b = PairwiseCollator(0, layout=layout, padding_side=side, pad_to_multiple_of=multiple,
                         max_tokens_per_row=capacity)(feats)
    n = len(feats)
    prompts = [f["prompt_ids"] for f in feats] * 2
    completions = [f["chosen_ids"] for f in feats] + [f["rejected_ids"] for f in feats]
    flat_ids = b["input_ids"].view(-1)
    flat_pos = b["position_ids"].view(-1)
    rows, width = b["input_ids"].shape
    assert b["target_seq"].bincount(minlength=2 * n).tolist() == [len(c) for c in completions]
    for s in range(2 * n):
        sel = b["target_seq"] == s
        targets, preds = b["target_index"][sel], b["pred_index"][sel]
        full = prompts[s] + completions[s]
        assert flat_ids[targets].tolist() == completions[s]
        assert flat_ids[preds].tolist() == full[len(prompts[s]) - 1 : -1]
        assert flat_pos[targets].tolist() == list(range(len(prompts[s]), len(full)))
        assert flat_ids[b["last_index"][s]].item() == full[-1]
        assert b["last_index"][s].item() == targets[-1].item()
        assert (targets // width == preds // width).all()  # predicted within the same row
        if layout == "padded":
            assert (preds == targets - 1).all()
            assert b["attention_mask"].view(-1)[targets].eq(1).all()
        else:
            # the last token sees exactly the sequence's own tokens: its prompt and its completion
            r, col = divmod(b["last_index"][s].item(), width)
            keys = allowed(b["attention_mask"])[r, col].nonzero().squeeze(-1)
            assert flat_ids[r * width + keys].tolist() == full
    if layout != "padded":
        # attention_blocks allow exactly what the 4D mask allows, for every real token; pads are in no block
        from_blocks = torch.zeros(rows, width, width, dtype=torch.bool)
        for r, q0, q1, p0, p1 in b["attention_blocks"].tolist():
            assert p0 <= p1 <= q0 < q1 <= width
            from_blocks[r, q0:q1, p0:p1] = True
            from_blocks[r, q0:q1, q0:q1] = torch.ones(q1 - q0, q1 - q0, dtype=torch.bool).tril()
        covered = from_blocks.any(-1)  # (R, T): query columns in a block
        mask = allowed(b["attention_mask"])
        assert torch.equal(from_blocks[covered], mask[covered])
        assert torch.equal(mask[~covered], torch.eye(width, dtype=torch.bool).expand(rows, width, width)[~covered])
        shared = len(feats) if layout == "shared_prompt" else 0
        assert covered.sum() == sum(len(p) + len(c) for p, c in zip(prompts, completions)) - sum(
            len(f["prompt_ids"]) for f in feats[:shared])
    if layout == "padded":
        assert rows == 2 * n
        assert "attention_blocks" not in b
    elif layout == "shared_prompt" and capacity is None:
        assert rows == n
    elif layout == "shared_prompt":
        assert rows <= n and width <= -(-capacity // (multiple or 1)) * (multiple or 1)
