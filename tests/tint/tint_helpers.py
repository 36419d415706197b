"""Tiny random Llama-style models for the TinT tests (float64, in memory)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, *, hidden: int = 32, intermediate: int = 64, layers: int = 3, heads: int = 4,
               kv_heads: int = 2, vocab: int = 61, tied: bool = False, std: float = 0.15,
               dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """A random LlamaForCausalLM with grouped queries; weights drawn larger than the default init
    (std 0.15) so the nonlinearities (softmax, RMSNorm, SiLU) are far from linear."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=std,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norm gains
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


