import copy

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaForSequenceClassification

from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.models.value import ActorCritic, ValueHead, active_adapter, attach_shared_lora
from hfrlhf.ops.logprobs import batch_logprobs, token_entropy
from hfrlhf.ops.rollout import reference_logps, sequence_batch, truncate_at_stop

EOS = 2


@pytest.fixture
def batch():
    responses = truncate_at_stop(torch.tensor([[11, 12, EOS, EOS], [13, 14, 15, 16]]), [EOS], EOS)
    return sequence_batch(torch.tensor([[EOS, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]), responses, EOS)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def _perturb_lora(model, adapter):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}." in name and "lora_B" in name:
                p.normal_(std=0.5)


def test_value_head_inits():
    assert ValueHead(8)(torch.randn(3, 8)).eq(0).all()
    state = torch.random.get_rng_state()
    a, b = ValueHead(8, init_std=0.1, seed=3), ValueHead(8, init_std=0.1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # its own generator: the global stream is untouched
    assert torch.equal(a.linear.weight, b.linear.weight) and 0.02 < a.linear.weight.std() < 0.3
    score = torch.nn.Linear(8, 1, bias=False)
    h = torch.randn(5, 8)
    torch.testing.assert_close(ValueHead.from_score(score)(h), score(h).squeeze(-1))
    assert ValueHead(8)(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_shared_lora_has_two_trainable_adapters_and_switches_back(tok):
    model, policy_name = attach_shared_lora(build_tiny_llama(tok), _lora())
    assert policy_name == "policy" and model.active_adapter == "policy"
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "critic"}
    with active_adapter(model, "critic", ["policy", "critic"]):
        assert model.active_adapter == "critic"
        assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"policy", "critic"}
    assert model.active_adapter == "policy"


def test_reference_is_the_base_model_with_adapters_off(tok, batch):
    base = build_tiny_llama(tok, seed=4)
    original = copy.deepcopy(base)
    model, _ = attach_shared_lora(base, _lora())
    _perturb_lora(model, "policy")
    _perturb_lora(model, "critic")
    expected = batch_logprobs(original, batch).token_logps
    torch.testing.assert_close(reference_logps(model, batch), expected)
    with torch.no_grad():
        assert not torch.allclose(batch_logprobs(model, batch).token_logps, expected)  # the adapter is active


def test_actor_critic_one_base_forward(tok, batch):
    model, _ = attach_shared_lora(build_tiny_llama(tok, seed=1), _lora())
    _perturb_lora(model, "policy")
    ac = ActorCritic(model, value_head=ValueHead(32, init_std=0.5), critic_adapter="critic", temperature=0.7)
    out = ac(batch)
    torch.testing.assert_close(out.logps, batch_logprobs(model, batch, temperature=0.7).token_logps)
    n = batch["target_index"].shape[0]
    assert out.values.shape == (n,) and out.entropy.shape == (n,) and out.ptx_loss is None
    # the critic reads the base with *its* adapter: perturbing the policy adapter leaves values alone
    before = out.values.detach().clone()
    _perturb_lora(model, "policy")
    torch.testing.assert_close(ac.values(batch).detach(), before)
    _perturb_lora(model, "critic")
    assert not torch.allclose(ac.values(batch).detach(), before)
    assert model.active_adapter == "policy"
    # one backward reaches both adapters and the head
    again = ac(batch)
    (again.logps.sum() + again.values.sum()).backward()
    grads = {n.split(".")[-2] for n, p in ac.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"policy", "critic", "linear"} <= grads


def test_entropy_with_gradient_matches_the_metric(tok, batch):
    policy = build_tiny_llama(tok, seed=2)
    ac = ActorCritic(policy, temperature=0.9, chunk_size=3)
    out = ac(batch, entropy_grad=True)
    h = policy.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).last_hidden_state
    h = h.reshape(-1, h.shape[-1])[batch["pred_index"]]
    torch.testing.assert_close(out.entropy.detach(), token_entropy(h, policy.lm_head.weight, temperature=0.9))
    out.entropy.sum().backward()
    assert policy.lm_head.weight.grad is not None
    assert out.values is None


def test_ptx_loss_is_the_mean_nll(tok, batch):
    from hfrlhf.data.collators import SFTCollator

    policy = build_tiny_llama(tok, seed=2)
    ptx = SFTCollator(EOS)([{"prompt_ids": [5, 6], "completion_ids": [7, 8, EOS]}])
    out = ActorCritic(policy)(batch, ptx)
    torch.testing.assert_close(out.ptx_loss, -batch_logprobs(policy, ptx).token_logps.mean())


def test_save_and_load_one_base_layout(tmp_path, tok, batch):
    model, _ = attach_shared_lora(build_tiny_llama(tok, seed=1), _lora())
    _perturb_lora(model, "policy")
    _perturb_lora(model, "critic")
    ac = ActorCritic(model, value_head=ValueHead(32, init_std=0.5), critic_adapter="critic")
    expected = ac(batch)
    ac.save(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "critic" / "value_head.safetensors").is_file()
    fresh, _ = attach_shared_lora(build_tiny_llama(tok, seed=1), _lora())
    restored = ActorCritic(fresh, value_head=ValueHead(32), critic_adapter="critic")
    restored.load(tmp_path)
    out = restored(batch)
    torch.testing.assert_close(out.logps, expected.logps)
    torch.testing.assert_close(out.values, expected.values)
    # the root is a plain adapter folder: peft loads it onto the base as the policy
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(build_tiny_llama(tok, seed=1), str(tmp_path))
    torch.testing.assert_close(batch_logprobs(loaded, batch).token_logps, expected.logps)


def test_save_and_load_separate_critic(tmp_path, tok, batch):
    config = build_tiny_llama(tok).config
    config.num_labels = 1
    reward = LlamaForSequenceClassification(config)
    policy = build_tiny_llama(tok, seed=3)
    ac = ActorCritic(policy, critic=copy.deepcopy(reward).get_decoder(), value_head=ValueHead.from_score(reward.score))
    with torch.no_grad():
        for p in ac.parameters():
            p.add_(0.01)
    expected = ac(batch)
    ac.save(tmp_path)
    restored = ActorCritic(build_tiny_llama(tok, seed=3), critic=copy.deepcopy(reward).get_decoder(),
                           value_head=ValueHead(32))
    restored.load(tmp_path)
    out = restored(batch)
    torch.testing.assert_close(out.logps, expected.logps)
    torch.testing.assert_close(out.values, expected.values)


def test_build_critic_order_of_preference(tok):
    from hfrlhf.models.value import build_critic

    config = build_tiny_llama(tok).config
    config.num_labels = 1
    reward, value_model = LlamaForSequenceClassification(config), LlamaForSequenceClassification(config)
    policy = build_tiny_llama(tok)
    critic, head = build_critic(policy, value_model=value_model, reward_model=reward)
    assert critic is value_model.model and torch.equal(head.linear.weight, value_model.score.weight)
    assert build_critic(policy, reward_model=reward, critic_adapter="critic")[0] is None
    critic, head = build_critic(policy, reward_model=reward)
    assert critic is not reward.model and torch.equal(head.linear.weight, reward.score.weight)
    critic, head = build_critic(policy, reward_model=reward, critic_init="policy")
    assert head.linear.weight.eq(0).all() and critic is not policy.model
    with pytest.raises(ValueError, match="critic_init='reward'"):
        build_critic(policy, critic_init="reward")
