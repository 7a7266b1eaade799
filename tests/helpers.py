"""Small builders shared by several test modules (importable as ``helpers``: ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations


def unpaired_chat(prompt: str, completion: str, label: bool) -> dict:
    """One conversational unpaired (KTO) row: a user prompt, an assistant completion and its thumbs-up/down."""
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}], "label": label}
