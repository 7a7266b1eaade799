import pytest
import torch
from transformers import LlamaForSequenceClassification

from hfrlhf.losses.ppo import policy_loss, value_loss
from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.ops.advantages import gae
from hfrlhf.ops.masked import RunningMoments, masked_whiten
from hfrlhf.ops.rollout import (
    Responses,
    Rollout,
    call_reward_fn,
    compute_advantages,
    generate,
    generate_with_logprobs,
    make_generation_config,
    reward_model_batch,
    score_with_model,
    sequence_batch,
    shape_scores,
    to_grid,
    token_kl,
    truncate_at_stop,
    update_loss,
)

EOS = PAD = 2  # pad == eos, as in SmolLM2 and the tiny tokenizer


# --- 1. truncation -----------------------------------------------------------------------------------------------
def test_truncate_keeps_first_stop_token_and_pads_the_rest():
    ids = torch.tensor([
        [5, 6, EOS, 7, 8],  # stop in the middle: 7, 8 are dropped
        [5, 6, 7, 8, 1],  # no stop: cut at the limit
        [EOS, 5, EOS, 6, 7],  # stop first: a one-token response
        [5, 9, 6, 9, 7],  # 9 is an extra stop token
    ])
    r = truncate_at_stop(ids, [EOS, 9], pad_token_id=PAD)
    assert r.lengths.tolist() == [3, 5, 1, 2]
    assert r.ended.tolist() == [True, False, True, True]
    assert r.ids.tolist() == [[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 1], [EOS, PAD, PAD, PAD, PAD], [5, 9, PAD, PAD, PAD]]
    assert r.mask.tolist()[0] == [True, True, True, False, False]


def test_truncate_without_stop_tokens_keeps_everything():
    r = truncate_at_stop(torch.tensor([[5, EOS, 6]]), [], pad_token_id=PAD)
    assert r.lengths.tolist() == [3] and r.ended.tolist() == [False]


def test_generate_then_truncate_on_the_tiny_model(tok):
    model = build_tiny_llama(tok, seed=0)
    prompts = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])  # left-padded, pad == eos
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    config = make_generation_config(max_new_tokens=6, temperature=1.0, top_k=None, top_p=1.0,
                                    stop_token_ids=[EOS], pad_token_id=PAD)
    torch.manual_seed(0)
    raw = generate(model, prompts, mask, config)
    assert raw.shape[0] == 2 and 1 <= raw.shape[1] <= 6
    r = truncate_at_stop(raw, [EOS], PAD)
    for row, n, ended in zip(r.ids.tolist(), r.lengths.tolist(), r.ended.tolist()):
        assert all(t == PAD for t in row[n:])
        assert (row[n - 1] == EOS) == ended and EOS not in row[: n - 1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_with_logprobs_equals_a_teacher_forced_pass(tok, temperature):
    # the log-prob of each sampled token read from generation's logits must be the one a separate forward pass
    # over prompt + response gives: checked row by row on the unpadded sequence, with the model's own logits
    model = build_tiny_llama(tok, seed=0).eval()
    prompts = torch.tensor([[PAD, PAD, 5, 6], [PAD, 11, 12, 13], [7, 8, 9, 10]])  # left-padded, pad == eos
    mask = (torch.arange(4) >= torch.tensor([[2], [1], [0]])).long()
    config = make_generation_config(max_new_tokens=7, temperature=temperature, top_k=None, top_p=1.0,
                                    stop_token_ids=[EOS], pad_token_id=PAD)
    torch.manual_seed(0)
    raw, logps = generate_with_logprobs(model, prompts, mask, config, temperature)
    torch.manual_seed(0)
    assert torch.equal(raw, generate(model, prompts, mask, config))  # the same samples as plain generate
    r = truncate_at_stop(raw, [EOS], PAD)
    for b in range(3):
        prompt = prompts[b][mask[b].bool()]
        response = r.ids[b, : r.lengths[b]]
        full = torch.cat([prompt, response]).unsqueeze(0)
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1] / temperature  # predictions of the response
        expected = torch.log_softmax(logits, -1).gather(1, response.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(logps[b, : r.lengths[b]], expected, atol=1e-5, rtol=1e-5)


# --- 2. the last real token, whatever the padding and with pad == eos -----------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_index_is_the_responses_own_eos(side):
    prompt_rows = [[5, 6, 7], [8]]
    width = 3
    pad = [[PAD] * (width - len(p)) for p in prompt_rows]
    ids = [(q + p if side == "left" else p + q) for p, q in zip(prompt_rows, pad)]
    mask = [([0] * len(q) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(q)) for p, q in zip(prompt_rows, pad)]
    # row 0 ends with EOS followed by pads (== EOS); row 1 was cut at the length limit
    responses = truncate_at_stop(torch.tensor([[11, EOS, EOS, EOS], [12, 13, 14, 15]]), [EOS], PAD)
    batch = sequence_batch(torch.tensor(ids), torch.tensor(mask), responses, PAD)
    flat = batch["input_ids"].reshape(-1)
    row_len = batch["input_ids"].shape[1]
    last = batch["last_index"].tolist()
    # sequence 0 = [5, 6, 7, 11, EOS]: its last token is the first EOS (column 4), not a pad after it
    assert divmod(last[0], row_len) == (0, 4) and flat[last[0]] == EOS
    # sequence 1 = [8, 12, 13, 14, 15]: last token 15 at column 4
    assert divmod(last[1], row_len) == (1, 4) and flat[last[1]] == 15
    assert batch["input_ids"][0].tolist()[:5] == [5, 6, 7, 11, EOS]
    # the scored tokens are exactly the response tokens, in order
    assert flat[batch["target_index"]].tolist() == [11, EOS, 12, 13, 14, 15]


def test_empty_prompt_is_refused():
    r = Responses(torch.tensor([[5]]), torch.tensor([1]), torch.tensor([False]))
    with pytest.raises(ValueError, match="empty prompt"):
        sequence_batch(torch.tensor([[PAD]]), torch.tensor([[0]]), r, PAD)


def test_score_with_model_reads_the_last_real_token(tok):
    config = build_tiny_llama(tok).config
    config.num_labels = 1
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    prompts = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    responses = truncate_at_stop(torch.tensor([[11, EOS, EOS], [12, 13, 14]]), [EOS], PAD)
    batch = sequence_batch(prompts, mask, responses, PAD)
    scores = score_with_model(rm, batch)
    # independent: each unpadded sequence alone through the decoder, the head on its final position
    seqs = ([5, 6, 11, EOS], [7, 8, 9, 12, 13, 14])
    with torch.no_grad():
        expected = [rm.score(rm.model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]).item() for s in seqs]
        # the trap this avoids: the classifier's own pooling looks for the last token != pad, and pad == EOS
        pooled = rm(input_ids=torch.tensor([seqs[0]])).logits[0, 0].item()
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert abs(pooled - expected[0]) > 1e-3


def test_reward_model_batch_retokenizes_with_its_own_template(tok):
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "one two"}]]
    batch = reward_model_batch(tok, prompts, ["hello", "three four"], torch.tensor([True, False]))
    flat = batch["input_ids"].reshape(-1)
    texts = [tok.decode(flat[batch["target_index"][batch["target_seq"] == s]]) for s in range(2)]
    assert texts == ["hello<|im_end|>", "three four"]  # an unfinished response gets no EOS
    assert flat[batch["last_index"][0]] == tok.eos_token_id
    assert "<|im_start|>assistant" in tok.decode(batch["input_ids"][0])


def test_call_reward_fn_checks_its_output():
    assert call_reward_fn(lambda p, c: torch.tensor([1.0, 2.0]), ["a", "b"], ["x", "y"]).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        call_reward_fn(lambda p, c: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="non-finite"):
        call_reward_fn(lambda p, c: [1.0, float("nan")], ["a", "b"], ["x", "y"])


# --- 3. grids -----------------------------------------------------------------------------------------------------
def test_to_grid_round_trips_and_keeps_gradients():
    responses = truncate_at_stop(torch.tensor([[3, 4, EOS, 9], [5, EOS, 9, 9], [6, 7, 8, 1]]), [EOS], PAD)
    batch = sequence_batch(torch.tensor([[5], [6], [7]]), torch.ones(3, 1), responses, PAD)
    flat = batch["input_ids"].reshape(-1)[batch["target_index"]].float().requires_grad_()
    grid = to_grid(flat, batch, responses.lengths, width=4)
    assert torch.equal(grid.long(), torch.where(responses.mask, responses.ids, 0))
    grid.sum().backward()
    assert torch.equal(flat.grad, torch.ones_like(flat))
    with pytest.raises(ValueError):
        to_grid(flat[:-1], batch, responses.lengths, width=4)


# --- 4. rewards ---------------------------------------------------------------------------------------------------
def test_shape_scores_penalty_normalisation_clip():
    scores, ended = torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([True, True, False, True])
    assert shape_scores(scores, ended, missing_eos_penalty=2.0).tolist() == [1.0, 2.0, 1.0, 10.0]
    running = RunningMoments()
    out = shape_scores(scores, ended, running=running, clip=1.0)
    mean, std = scores.mean().item(), scores.std().item()
    torch.testing.assert_close(out, ((scores - mean) / std).clamp(-1, 1))
    assert running.count == 4


def test_per_token_rewards_score_at_last_token_minus_beta_kl():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kl = token_kl(logps, ref, mask, "k1")
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]
    k3 = token_kl(logps, ref, mask, "k3")
    assert (k3 >= 0).all() and k3[1, 1:].eq(0).all()
    # GAE with gamma = lam = 1 and zero values: the advantage of token t is the reward-to-go
    adv, ret = compute_advantages("gae", torch.tensor([2.0, 4.0]), kl, mask, values=torch.zeros(2, 3), beta=0.1,
                                  gamma=1.0, lam=1.0, whiten_advantages=False)
    rewards = [[-0.05, 0.1, 2.0], [-0.1 + 4.0, 0.0, 0.0]]
    togo = [[sum(rewards[0][t:]) for t in range(3)], [rewards[1][0], 0.0, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(togo))
    torch.testing.assert_close(ret, adv)


def test_gae_estimator_matches_ops_and_whitens():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    kl, values, scores = torch.rand(2, 4), torch.randn(2, 4), torch.tensor([1.0, -1.0])
    adv, ret = compute_advantages("gae", scores, kl, mask, values=values, beta=0.2, gamma=0.9, lam=0.8)
    rewards = -0.2 * torch.where(mask, kl, 0.0)
    rewards[0, 2] += 1.0
    rewards[1, 1] -= 1.0
    ref_adv, ref_ret = gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, masked_whiten(ref_adv, mask))
    torch.testing.assert_close(ret, ref_ret)
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages("gae", scores, kl, mask)


def test_critic_free_estimators_broadcast_a_sequence_advantage():
    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[1, 1] = False
    kl = torch.zeros(4, 2)
    kl[0] = 1.0  # sequence 0 pays beta * 2 of KL
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    rloo, none = compute_advantages("rloo", scores, kl, mask, beta=0.5, k=2, whiten_advantages=False)
    assert none is None
    # group 0: rewards [0, 3] -> [-3, 3]; group 1: [0, 0] -> 0
    assert rloo.tolist() == [[-3.0, -3.0], [3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    grpo, _ = compute_advantages("grpo", scores, kl, mask, beta=0.5, k=2)
    assert grpo[0, 0] < 0 < grpo[1, 0] and grpo[2:].eq(0).all() and grpo[1, 1] == 0
    rpp, _ = compute_advantages("reinforce_pp", scores, kl, mask, beta=0.5, k=2)
    assert rpp.shape == (4, 2) and rpp[1, 1] == 0
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo2", scores, kl, mask)


# --- 6. the update loss ---------------------------------------------------------------------------------------------
def test_rollout_select_and_update_loss():
    from hfrlhf.models.value import PolicyValueOutput

    torch.manual_seed(0)
    responses = truncate_at_stop(torch.tensor([[3, 4, EOS], [5, EOS, 9], [6, 7, 8]]), [EOS], PAD)
    grid = lambda: torch.where(responses.mask, torch.randn(3, 3), 0.0)  # noqa: E731
    rollout = Rollout(torch.tensor([[5], [6], [7]]), torch.ones(3, 1, dtype=torch.long), responses, grid(), grid(),
                      grid(), grid())
    sub = rollout.select(torch.tensor([2, 0]))
    assert sub.responses.lengths.tolist() == [3, 3] and torch.equal(sub.logps[1], rollout.logps[0])
    batch = sequence_batch(sub.prompt_ids, sub.prompt_mask, sub.responses, PAD)
    n = batch["target_index"].shape[0]
    out = PolicyValueOutput(torch.randn(n), torch.randn(n), torch.rand(n), torch.tensor(2.0))
    loss, metrics = update_loss(out, batch, sub, vf_coef=0.5, entropy_coef=0.1, ptx_coef=0.25)
    mask = sub.responses.mask
    as_grid = lambda t: to_grid(t, batch, sub.responses.lengths, 3)  # noqa: E731
    expected = (policy_loss(as_grid(out.logps), sub.logps, sub.advantages, mask).loss
                + 0.5 * value_loss(as_grid(out.values), sub.values, sub.returns, mask).loss
                - 0.1 * as_grid(out.entropy)[mask].mean() + 0.25 * 2.0)
    torch.testing.assert_close(loss, expected)
    assert {"policy/clipfrac", "val/error", "policy/entropy_avg", "loss/ptx"} <= metrics.keys()
