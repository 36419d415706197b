"""Fixtures for the TinT tests: tiny random Llama-style models (float64, in memory)."""

from __future__ import annotations

import pytest
import torch

from ftlab.tint.inner import inner_from_hf

from tint_helpers import tiny_llama


@pytest.fixture
def tiny_hf():
    return tiny_llama()


@pytest.fixture
def tiny_inner(tiny_hf):
    return inner_from_hf(tiny_hf)


@pytest.fixture
def sequence():
    """24 token ids, the first 16 the training part."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 61, (24,), generator=g), 16
