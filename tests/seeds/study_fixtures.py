"""Shared by tests/seeds and tests/scaling: a tiny model saved as a local folder (so code that
loads ``cfg.model`` by name runs on it) and a learnable cue-word task as a JSONL file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

FILLER = ["the", "movie", "story", "was", "a", "film", "and", "it", "acting", "plot"]


def save_tiny_model(folder: Path, model, tokenizer) -> str:
    """Save ``model`` and ``tokenizer`` with ``save_pretrained``; returns the folder as a model name."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_cue_task(path: Path, n: int = 96, seed: int = 0) -> str:
    """Sentences whose label is one cue word (terrible/great), as JSONL; returns the path."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            words = rng.sample(FILLER, 4) + [["terrible", "great"][label]]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return str(path)


def task_overrides(prefix: str, model: str, task: str) -> list[str]:
    """Config overrides (under ``prefix``, e.g. ``train.``) for a fast run on the tiny model and task."""
    return [f"{prefix}model={model}", f"{prefix}data.task={task}", f"{prefix}data.template='{{text}} It was'",
            f"{prefix}data.options=[' terrible', ' great']", f"{prefix}data.n_train=32", f"{prefix}data.n_dev=16",
            f"{prefix}data.n_test=24", f"{prefix}mode=lora", f"{prefix}lora.r=2", f"{prefix}eval_batch_size=16"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny Llama (the shape of tests/conftest.py's; built here because those fixtures are
    per test and these folders are shared by a test module) saved as a local model folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tiny_tokenizer.pad_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), model, tiny_tokenizer)


@pytest.fixture(scope="module")
def cue_task(tmp_path_factory) -> str:
    """A 96-example cue-word task file."""
    return write_cue_task(tmp_path_factory.mktemp("task") / "cue.jsonl")
