"""The critic of PPO (a value head on a decoder) and :class:`ActorCritic`, the one module PPO optimises.

Two layouts:

1. **Separate critic** (full fine-tuning): the critic is its own decoder plus a :class:`ValueHead`. It starts as
   a copy of the reward model, head included (the DeepSpeed-Chat / ColossalChat convention: the critic then
   begins by predicting the final score from every prefix), or as a copy of the policy with a new head.
2. **One base model** (LoRA): a single base model carries two adapters. The policy is the base with adapter
   ``"policy"``, the reference is the base with every adapter disabled, and the critic is the base with
   adapter ``"critic"`` followed by a :class:`ValueHead` that is not part of the base. Memory is about one base
   model plus two adapters; the optimizer gets both adapters' parameters and the head's.

A new value head is initialised deliberately: zeros by default (``init_std=0``), so every value starts at 0
and the first value targets are the returns themselves, or from ``N(0, init_std^2)`` with its own seeded
generator (the global random stream is not touched, which keeps resumed runs identical to straight ones).

Values are read at ``pred_index``: the hidden state that predicts response token ``t`` is the state before
that token is taken, so ``values[:, t]`` is ``V(s_t)`` in GAE's ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from hfrlhf.losses.ppo import entropy_from_logits
from hfrlhf.models.loading import score_head
from hfrlhf.ops.logprobs import batch_logprobs, hidden_states, linear_logprob, token_entropy

__all__ = [
    "ActorCritic", "PolicyValueOutput", "ValueHead", "active_adapter", "attach_shared_lora", "build_critic",
    "separate_critic", "unwrap",
]

CRITIC_DIR = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside distributed wrappers (DDP's ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(unwrap(model), PeftModel)


class ValueHead(nn.Module):
    """``V(h) = w . h + b``: one scalar per hidden state, always computed in float32.

    Shape: ``(..., H) -> (...)``.

    >>> head = ValueHead(4)  # zero-initialised: every value starts at 0
    >>> head(torch.randn(2, 3, 4)).abs().sum().item()
    0.0
    """

    def __init__(self, hidden_size: int, *, init_std: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.linear = torch.nn.utils.skip_init(nn.Linear, hidden_size, 1)  # no draw from the global stream
        with torch.no_grad():
            self.linear.bias.zero_()
            if init_std > 0:
                gen = torch.Generator().manual_seed(seed)
                self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=gen) * init_std)
            else:
                self.linear.weight.zero_()

    @classmethod
    def from_score(cls, score: nn.Module) -> ValueHead:
        """A head holding a copy of a reward model's scalar head (``score``: ``Linear(H, 1)``, bias optional)."""
        weight = getattr(score, "weight", None)
        if weight is None or weight.dim() != 2 or weight.shape[0] != 1:
            raise ValueError(f"expected a Linear(H, 1) score head, got {score}")
        head = cls(weight.shape[1])
        with torch.no_grad():
            head.linear.weight.copy_(weight.detach().float())
            bias = getattr(score, "bias", None)
            if bias is not None:
                head.linear.bias.copy_(bias.detach().float())
        return head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            weight, bias = self.linear.weight.float(), self.linear.bias.float()
            return nn.functional.linear(hidden.float(), weight, bias).squeeze(-1)


@contextmanager
def active_adapter(model: nn.Module, name: str, trainable: list[str] | None = None) -> Iterator[None]:
    """Run the body with peft adapter ``name`` active, then switch back.

    peft's ``set_adapter`` also freezes every adapter but the active one; ``trainable`` lists the adapters
    whose parameters must keep ``requires_grad=True`` whichever is active (the optimizer trains all of them).
    """
    peft_model = unwrap(model)
    previous = peft_model.active_adapter
    if previous == name:
        yield
        return
    peft_model.set_adapter(name)
    if trainable:
        peft_model.set_requires_grad(trainable, True)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        if trainable:
            peft_model.set_requires_grad(trainable, True)


def attach_shared_lora(
    model: nn.Module,
    peft_config: Any,
    *,
    policy_adapter: str = "policy",
    critic_adapter: str | None = "critic",
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module, str]:
    """Give one base model a policy adapter and (optionally) a critic adapter with the same LoRA config.

    ``model`` may already be a ``PeftModel``: its active adapter is then the policy's. k-bit (QLoRA) models
    are prepared for training first. Returns ``(peft_model, policy_adapter_name)``; both adapters are trainable.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if _is_peft(model):
        if peft_config is not None:
            raise ValueError("the model already carries a peft adapter; pass either a PeftModel or peft_config")
        policy_adapter = model.active_adapter
        peft_config = model.peft_config[policy_adapter]
    else:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model = get_peft_model(model, peft_config, adapter_name=policy_adapter)
    names = [policy_adapter]
    if critic_adapter is not None:
        if critic_adapter in model.peft_config:
            raise ValueError(f"the model already has an adapter named {critic_adapter!r}")
        model.add_adapter(critic_adapter, copy.deepcopy(peft_config))
        names.append(critic_adapter)
    model.set_adapter(policy_adapter)
    model.set_requires_grad(names, True)
    return model, policy_adapter


def separate_critic(
    source: nn.Module, *, with_score: bool, init_std: float = 0.0, seed: int = 0, copy_source: bool = True
) -> tuple[nn.Module, ValueHead]:
    """A trainable critic: the decoder of ``source`` (copied unless ``copy_source=False``) and a value head.

    With ``with_score`` the head copies ``source``'s scalar head (a reward or value model: the critic starts out
    predicting the final score); otherwise it is new (``init_std``, ``seed``; see the module docstring). A peft
    ``source`` is merged first. Quantized models are refused: their weights cannot be trained in full.
    """
    model = unwrap(source)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("a quantized model cannot become a fully trained critic; use LoRA (peft_config) so the "
                         "critic is an adapter on the policy's base")
    model = copy.deepcopy(model) if copy_source else model
    if _is_peft(model):
        model = model.merge_and_unload()
    if with_score:
        head = ValueHead.from_score(score_head(model))
    else:
        head = ValueHead(model.config.get_text_config().hidden_size, init_std=init_std, seed=seed)
    decoder = model.get_decoder()
    decoder.requires_grad_(True)
    return decoder, head


def build_critic(
    policy: nn.Module,
    *,
    value_model: nn.Module | None = None,
    reward_model: nn.Module | None = None,
    critic_init: str = "auto",
    critic_adapter: str | None = None,
    init_std: float = 0.0,
    seed: int = 0,
) -> tuple[nn.Module | None, ValueHead]:
    """The critic as ``(separate decoder or None, value head)``, in this order of preference:

    1. ``value_model``: its decoder, trained in place, and a copy of its score head;
    2. ``critic_adapter`` (one-base LoRA layout): no separate decoder, a new head on the policy's base;
    3. ``reward_model`` (one that reads the policy's tokens) unless ``critic_init="policy"``: a copy, head included
       (of a ``RewardEnsemble``: its first member);
    4. a copy of the policy with a new head.
    """
    hidden = unwrap(policy).config.get_text_config().hidden_size
    if value_model is not None:
        return separate_critic(value_model, with_score=True, copy_source=False)
    if critic_adapter is not None:
        return None, ValueHead(hidden, init_std=init_std, seed=seed)
    if critic_init == "reward" and reward_model is None:
        raise ValueError("critic_init='reward' needs a reward model that shares the policy's tokenizer")
    from_reward = reward_model is not None and critic_init != "policy"
    members = getattr(reward_model, "members", None)
    if from_reward and isinstance(members, nn.ModuleList):  # a RewardEnsemble
        reward_model = members[0]
    return separate_critic(reward_model if from_reward else policy, with_score=from_reward, init_std=init_std,
                           seed=seed)


class PolicyValueOutput(NamedTuple):
    """One forward of :class:`ActorCritic` over a batch with ``N`` scored (response) tokens."""

    logps: torch.Tensor  # (N,) log-prob of each scored token under the policy at ``temperature``
    values: torch.Tensor | None  # (N,) critic value of the state before each scored token, None without critic
    entropy: torch.Tensor  # (N,) entropy of the next-token distribution (with gradient only when asked)
    ptx_loss: torch.Tensor | None  # () mean NLL of the PTX batch's completion tokens, None without one


def _entropy_chunk(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = hidden.to(weight.dtype) @ weight.T
    return entropy_from_logits(logits.float() / temperature)


class ActorCritic(nn.Module):
    """The policy and its critic as one module: the Trainer builds one optimizer over it and saves it.

    Args:
        policy: a causal LM, or a ``PeftModel`` (one-base layout with ``critic_adapter``).
        critic: the separate critic's decoder (``model.get_decoder()`` of a reward model or policy copy),
            or None (one-base layout, or no critic at all).
        value_head: the critic's :class:`ValueHead`; None for critic-free estimators (RLOO, GRPO, REINFORCE++).
        critic_adapter: name of the critic's peft adapter on the policy's base (one-base layout).
        temperature: sampling temperature; log-probs are taken under the same tempered distribution.
        chunk_size: scored tokens per chunk of the vocabulary projection.

    ``forward(batch)`` takes a batch in the index scheme of ``docs/architecture.md``; calling it through the
    accelerate-prepared module keeps DDP's gradient hooks in play.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        critic: nn.Module | None = None,
        value_head: ValueHead | None = None,
        critic_adapter: str | None = None,
        temperature: float = 1.0,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        if critic is not None and critic_adapter is not None:
            raise ValueError("give either a separate critic or a critic adapter, not both")
        if (critic is not None or critic_adapter is not None) and value_head is None:
            raise ValueError("a critic needs a value head")
        if critic_adapter is not None and not _is_peft(policy):
            raise ValueError("critic_adapter needs a peft policy")
        self.policy = policy
        self.critic = critic
        self.value_head = value_head
        self.critic_adapter = critic_adapter
        self.policy_adapter = unwrap(policy).active_adapter if _is_peft(policy) else None
        self.temperature = float(temperature)
        self.chunk_size = chunk_size

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    @property
    def trainable_adapters(self) -> list[str]:
        return [a for a in (self.policy_adapter, self.critic_adapter) if a is not None]

    # --- forward passes ---------------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, torch.Tensor],
        ptx_batch: dict[str, torch.Tensor] | None = None,
        *,
        entropy_grad: bool = False,
    ) -> PolicyValueOutput:
        """Policy log-probs, critic values and entropies of ``batch``'s scored tokens (and the PTX loss)."""
        hidden = hidden_states(self.policy, batch)  # (R, T, H)
        h = hidden.reshape(-1, hidden.shape[-1])[batch["pred_index"]]  # (N, H)
        weight = unwrap(self.policy).get_output_embeddings().weight  # (V, H)
        targets = batch["input_ids"].reshape(-1)[batch["target_index"]]  # (N,)
        logps = linear_logprob(h, weight, targets, chunk_size=self.chunk_size, temperature=self.temperature)
        if entropy_grad:  # recomputed in backward chunk by chunk, so no (N, V) logits are kept
            parts = [checkpoint(_entropy_chunk, c, weight, self.temperature, use_reentrant=False)
                     for c in h.split(self.chunk_size)]
            entropy = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
        else:
            entropy = token_entropy(h.detach(), weight, chunk_size=self.chunk_size, temperature=self.temperature)
        values = self.values(batch) if self.has_critic else None
        ptx_loss = None
        if ptx_batch is not None:
            ptx_logps = batch_logprobs(self.policy, ptx_batch, chunk_size=self.chunk_size).token_logps
            ptx_loss = -ptx_logps.mean()
        return PolicyValueOutput(logps, values, entropy, ptx_loss)

    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N,)`` critic values at ``batch["pred_index"]``."""
        if self.value_head is None:
            raise RuntimeError("this ActorCritic has no critic")
        if self.critic_adapter is not None:
            with active_adapter(self.policy, self.critic_adapter, self.trainable_adapters):
                hidden = hidden_states(self.policy, batch)
        else:
            assert self.critic is not None
            hidden = hidden_states(self.critic, batch)
        return self.value_head(hidden.reshape(-1, hidden.shape[-1])[batch["pred_index"]])

    # --- memory-saving options the Trainer forwards -----------------------------------------------------------
    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Recompute activations in backward, in the policy and the separate critic."""
        for module in (unwrap(self.policy), self.critic):
            if module is None:
                continue
            enable = getattr(module, "activation_checkpointing_enable", None) or getattr(
                module, "gradient_checkpointing_enable", None)
            if enable is not None:
                enable(**{k: v for k, v in kwargs.items() if k == "activation_checkpointing_kwargs"})

    gradient_checkpointing_enable = activation_checkpointing_enable

    # --- save / load ---------------------------------------------------------------------------------------------
    def save(self, output_dir: str | os.PathLike, *, is_main_process: bool = True) -> None:
        """Policy at ``output_dir`` in its usual loadable form; critic (and value head) in ``output_dir/critic``.

        A LoRA policy is written as a plain adapter (``PeftModel.from_pretrained(base, output_dir)``), a
        fully fine-tuned one with ``save_pretrained`` (``AutoModelForCausalLM.from_pretrained(output_dir)``).
        """
        if not is_main_process:
            return
        os.makedirs(output_dir, exist_ok=True)
        policy = unwrap(self.policy)
        if self.policy_adapter is not None:
            _save_adapter(policy, self.policy_adapter, output_dir)
        else:
            policy.save_pretrained(output_dir)
        if not self.has_critic:
            return
        critic_dir = os.path.join(output_dir, CRITIC_DIR)
        os.makedirs(critic_dir, exist_ok=True)
        if self.critic_adapter is not None:
            _save_adapter(policy, self.critic_adapter, critic_dir)
        else:
            save_model(self.critic, os.path.join(critic_dir, CRITIC_FILE))
        save_model(self.value_head, os.path.join(critic_dir, VALUE_HEAD_FILE))

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote (resuming from a Trainer checkpoint)."""
        policy = unwrap(self.policy)
        if self.policy_adapter is not None:
            _load_adapter(policy, self.policy_adapter, checkpoint_dir)
        else:
            _load_pretrained_weights(policy, checkpoint_dir)
        if not self.has_critic:
            return
        critic_dir = os.path.join(checkpoint_dir, CRITIC_DIR)
        if self.critic_adapter is not None:
            _load_adapter(policy, self.critic_adapter, critic_dir)
            unwrap(self.policy).set_requires_grad(self.trainable_adapters, True)
        else:
            _check(load_model(self.critic, os.path.join(critic_dir, CRITIC_FILE)), "critic")
        _check(load_model(self.value_head, os.path.join(critic_dir, VALUE_HEAD_FILE)), "value head")


def _check(result: tuple[list[str], list[str]], what: str) -> None:
    missing, unexpected = result
    if missing or unexpected:
        raise RuntimeError(f"{what} checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _save_adapter(peft_model: nn.Module, name: str, directory: str | os.PathLike) -> None:
    """One adapter as a plain, loadable adapter folder (peft itself would nest non-default names)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(directory, ADAPTER_FILE),
              metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def _load_adapter(peft_model: nn.Module, name: str, directory: str | os.PathLike) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, load_file(os.path.join(directory, ADAPTER_FILE)), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter {name!r} checkpoint has unexpected keys {unexpected[:5]}")


def _load_pretrained_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load ``save_pretrained`` safetensors (one file or shards) into ``model``; tied weights may be absent."""
    import json

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(directory, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory}")
    params = dict(model.state_dict())
    seen: set[str] = set()
    with torch.no_grad():
        for file in files:
            for key, value in load_file(file).items():
                if key not in params:
                    raise RuntimeError(f"checkpoint key {key!r} is not a parameter of the policy")
                params[key].copy_(value)
                seen.add(key)
    loaded = {t.data_ptr() for k, t in params.items() if k in seen}  # tied weights share storage
    missing = [k for k, t in params.items() if k not in seen and t.data_ptr() not in loaded]
    if missing:
        raise RuntimeError(f"policy checkpoint misses {missing[:5]}")
