"""Fixtures of the kernel tests."""

import pytest


@pytest.fixture
def gpt2_64(tiny_model_factory):
    """Tiny GPT-2 in float64 (its eager attention has no float32 softmax, so float64 is exact)."""
    return tiny_model_factory("gpt2").double()
