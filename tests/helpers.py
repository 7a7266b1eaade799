"""Small builders shared by several test modules (importable as ``helpers``: ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations


def unpaired_chat(prompt: str, completion: str, label: bool) -> dict:
    """One conversational unpaired (KTO) row: a user prompt, an assistant completion and its thumbs-up/down."""
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}], "label": label}


def assert_adapter_depends_on_seed_alone(make_trainer) -> None:
    """``make_trainer(seed)`` builds a trainer with a fresh LoRA adapter: the adapter's A matrices must be the same
    for the same seed whatever the process drew before, and differ for another seed."""
    import torch

    def adapter(seed: int, draws: int) -> dict:
        torch.rand(draws)  # whatever the process did before this trainer
        model = make_trainer(seed).model
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second, other = adapter(1, 3), adapter(1, 1000), adapter(2, 3)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
