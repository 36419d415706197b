"""Helpers shared by the LESS model-side tests (data, warm-up, features, baselines, pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ftlab.models import LoraSettings, apply_lora


def tiny_lora(model: nn.Module, dtype: torch.dtype = torch.float32, attn: str = "eager") -> nn.Module:
    """``model`` (a tiny Llama) in ``dtype`` and attention ``attn`` with LoRA (r=4) on q,v, seeded,
    and random non-zero B so every LoRA tensor has a non-zero gradient."""
    # Eager by default, as the pipeline: SDPA has no vmap batching rule on CPU (slow fallback).
    model.set_attn_implementation(attn)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
        torch.manual_seed(0)
        lora = apply_lora(model.to(dtype), LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1)
    return lora


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
