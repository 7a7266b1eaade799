"""Building models and tokenizers from one set of arguments: precision, attention, LoRA, 4/8-bit.

Every function accepts the bundled model's name (``"smollm2-135m-instruct"``), a local folder, or a Hub id
(the ordinary ``from_pretrained`` path, which needs the Hub to be reachable).

>>> args = ModelArguments(use_peft=True, lora_r=8)
>>> get_peft_config(args).r
8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hfrlhf.models.bundled import BUNDLED_NAME, bundled_model_path, is_bundled_name
from hfrlhf.models.quantized import keep_4bit_weights_trainable

__all__ = [
    "ModelArguments",
    "resolve_model_path",
    "load_tokenizer",
    "load_causal_lm",
    "load_reward_model",
    "load_bundled",
    "get_peft_config",
    "get_quantization_config",
    "bf16_supported",
    "score_head",
]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelArguments:
    """How to build the model: shared by every recipe and the ``hfrlhf`` command."""

    model_name_or_path: str = field(
        default=BUNDLED_NAME,
        metadata={"help": "Hub id, local folder, or 'smollm2-135m-instruct' for the bundled offline model."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "Weight dtype: float32, bfloat16, float16 or auto. Mixed precision is --bf16.",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2 (GPU only)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code shipped with a Hub repository. Off unless you trust it."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: every linear layer but the head."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantize the base weights to 4 bits (QLoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantize the base weights to 8 bits."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type: nf4 or fp4.",
                                                              "choices": ["nf4", "fp4"]})
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of 4-bit matmuls; 'auto' is bfloat16 where the device runs it fast, else float32."},
    )
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Quantize the 4-bit scales too."})

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of load_in_4bit and load_in_8bit, not both")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("a quantized base model cannot be trained in full: add --use_peft (QLoRA)")
        if self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive, got {self.lora_r}")


def resolve_model_path(name_or_path: str) -> str:
    """The bundled name becomes its converted local folder; anything else is returned unchanged."""
    return str(bundled_model_path()) if is_bundled_name(name_or_path) else str(name_or_path)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} or 'auto'") from None


def bf16_supported() -> bool:
    """True where bf16 matmuls are fast: a GPU with bf16, or a CPU with bf16 units (AVX512-BF16 or AMX).

    On CPUs without them (AVX2 only) torch still runs bf16, but hundreds of times slower than fp32.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _compute_dtype(name: str) -> torch.dtype | str | None:
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return _dtype(name)


def get_quantization_config(args: ModelArguments) -> BitsAndBytesConfig | None:
    """A bitsandbytes config for 4- or 8-bit loading, or None."""
    if args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=_compute_dtype(args.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def get_peft_config(args: ModelArguments, *, task_type: str = "CAUSAL_LM"):
    """A peft ``LoraConfig`` from the arguments, or None without ``use_peft``.

    For reward models (``task_type="SEQ_CLS"``) the score head is always trained and saved with the
    adapter (``modules_to_save``): a LoRA reward model without its head is no reward model.
    """
    if not args.use_peft:
        return None
    from peft import LoraConfig

    modules_to_save = list(args.lora_modules_to_save or [])
    if task_type == "SEQ_CLS":
        modules_to_save = sorted(set(modules_to_save) | {"score"})
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        bias="none",
    )


def load_tokenizer(name_or_path: str = BUNDLED_NAME, *, trust_remote_code: bool = False, **kwargs: Any
                   ) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (falls back to EOS as the pad token, as most chat models do)."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token; set one")
        tok.pad_token = tok.eos_token
    return tok


def _load_kwargs(args: ModelArguments) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "revision": args.model_revision,
        "trust_remote_code": args.trust_remote_code,
        "dtype": _dtype(args.torch_dtype),
    }
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    quant = get_quantization_config(args)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def load_causal_lm(args: ModelArguments | str = BUNDLED_NAME, **overrides: Any) -> PreTrainedModel:
    """A causal LM from ``ModelArguments`` (or a name). The LoRA adapter is not attached here: trainers
    take ``peft_config`` as TRL's do, so the same model object can also be used without one."""
    if isinstance(args, str):
        args = ModelArguments(model_name_or_path=args)
    kwargs = {**_load_kwargs(args), **overrides}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model_name_or_path), **kwargs)
    keep_4bit_weights_trainable(model)
    return model


def load_reward_model(args: ModelArguments | str = BUNDLED_NAME, **overrides: Any) -> PreTrainedModel:
    """A one-output sequence classifier (a reward model) from a causal LM checkpoint or a reward checkpoint.

    Its score head is initialised with a small std when new, and ``config.pad_token_id`` is set so the
    classifier finds the last real token even when pad == EOS.
    """
    if isinstance(args, str):
        args = ModelArguments(model_name_or_path=args)
    path = resolve_model_path(args.model_name_or_path)
    kwargs = {**_load_kwargs(args), "num_labels": 1, **overrides}
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    keep_4bit_weights_trainable(model)
    if model.config.pad_token_id is None:
        tok = load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        model.config.pad_token_id = tok.pad_token_id
    return model


def load_bundled(*, dtype: torch.dtype = torch.float32, reward: bool = False):
    """The bundled SmolLM2-135M-Instruct and its tokenizer, offline: ``model, tokenizer = load_bundled()``."""
    tok = load_tokenizer(BUNDLED_NAME)
    loader = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    extra = {"num_labels": 1} if reward else {}
    model = loader.from_pretrained(str(bundled_model_path()), dtype=dtype, **extra)
    if reward:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a reward / value model (``score`` for HF sequence classifiers)."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    for name in ("score", "v_head", "value_head", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            # peft's ModulesToSaveWrapper forwards to the active copy
            return head
    raise AttributeError(f"{type(inner).__name__} has no scalar head (score / v_head / value_head / classifier)")
