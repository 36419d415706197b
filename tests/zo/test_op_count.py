"""A MeZO step issues a bounded number of operations per parameter tensor, the same whatever the
tensors' sizes (counted with a dispatch-mode counter; the forwards are not part of the count)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ftlab.zo import MeZO, ZOMomentum
from ftlab.zo.opcount import count_step_ops

BOUND = 16  # operations per tensor per step (views included)


def _llama(hidden, device="cpu"):
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def _count(model, **kwargs):
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = MeZO(groups, lr=1e-4, eps=1e-3, chunk_size=1000, **kwargs)
    opt.step(lambda: 1.0)  # a first step creates the noise tables (once per device and dtype)
    return count_step_ops(opt), len(params)


@pytest.mark.parametrize("kwargs", [{}, {"n_perturbations": 2}, {"one_sided": True}])
def test_step_ops_do_not_grow_with_tensor_size(kwargs):
    small, n_small = _count(_llama(64), **kwargs)
    large, n_large = _count(_llama(256), **kwargs)  # 16x the entries per matrix, 16x more rows of z
    assert n_small == n_large
    assert small.by_op == large.by_op  # the same operations, one for one
    seeds = kwargs.get("n_perturbations", 1)
    assert small.views + small.compute <= BOUND * seeds * n_small
    assert small.compute <= 8 * seeds * n_small


def test_chunked_generator_grows_with_tensor_size():
    """The control: the earlier chunked table design loops over chunks."""
    small, _ = _count(_llama(32), generator="table")
    large, _ = _count(_llama(256), generator="table")
    assert large.compute > 4 * small.compute


def test_counts_on_the_meta_device_match_the_cpu():
    """Counting on ``meta`` (how a 7B shape is counted without its memory) sees the same ops."""
    cpu, _ = _count(_llama(64))
    meta, _ = _count(_llama(64, device="meta"))
    assert cpu.by_op == meta.by_op


def test_variants_bound_their_temporaries_and_still_count_per_tensor():
    model = _llama(64)
    opt = ZOMomentum(model.parameters(), lr=1e-4, chunk_size=1000)
    opt.step(lambda: 1.0)
    small = count_step_ops(opt)
    model = _llama(256)
    opt = ZOMomentum(model.parameters(), lr=1e-4, chunk_size=1000)
    opt.step(lambda: 1.0)
    assert count_step_ops(opt).by_op == small.by_op  # under TEMP_ELEMENTS per piece: no extra blocks
