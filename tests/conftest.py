"""Fixtures shared by the test modules."""

import pytest

from hfrlhf.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The tiny test tokenizer, one per test module (a module may change it, e.g. its chat template)."""
    return build_tiny_tokenizer()
