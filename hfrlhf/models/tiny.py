"""A tiny Llama and a small ChatML tokenizer, built offline in about a second.

They exist so that tests, docs examples and smoke runs of every trainer work on any machine with no
download. Both are deterministic: the same call gives the same vocabulary and (for a given seed) the same
weights.

>>> tok = build_tiny_tokenizer()
>>> model = build_tiny_llama(tok, seed=0)
>>> ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
>>> model(torch.tensor([ids])).logits.shape[-1] == len(tok)
True
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A small fixed corpus so the byte-level BPE learns some merges; the vocabulary still covers every byte.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I really loved this film, the acting was wonderful and the story was great.",
    "This was a terrible, boring movie and I hated every minute of it.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short review of the restaurant. The food was good and the staff were kind.",
    "user assistant system You are a helpful assistant.",
    "Human: hello there Assistant: hi, how can I help you today?",
    "one two three four five six seven eight nine ten",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template.

    Like SmolLM2, ``eos_token`` and ``pad_token`` are the same token (``<|im_end|>``), so code that builds
    masks from ``input_ids != pad_token_id`` is caught by the tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized for unit tests (about 30 k parameters)."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
