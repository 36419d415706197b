"""Features of a task split, computed chunk by chunk into a :class:`FeatureStore` (resumable)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch import nn

from ftlab.objectives import Encoder, build_prompts
from ftlab.probe.features import FeatureSpec, extract
from ftlab.probe.store import FeatureStore, ids_digest
from ftlab.tasks.base import Example, TaskSpec


def split_features(model: nn.Module, tokenizer, task: TaskSpec, examples: Sequence[Example], split: str,
                   spec: FeatureSpec, store: FeatureStore | None = None, *, batch_size: int = 16,
                   chunk_rows: int = 64, max_length: int = 256,
                   progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """``{kind: (len(examples), dim) float32}`` for the zero-shot prompts of ``examples``.

    With a ``store``, every kind's rows are read from it where present and the rest computed
    ``chunk_rows`` examples at a time, each chunk saved before the next starts (a killed run
    continues where it stopped). ``progress(n)`` is called with the examples done per chunk."""
    encoder = Encoder(tokenizer, task, max_length=max_length)
    prompts = build_prompts(task, examples)
    if store is None:
        out = extract(model, encoder, prompts, spec, batch_size)
        return {k: v.numpy() for k, v in out.items()}
    base = {"template": task.template, "n": len(examples), "ids_sha256": ids_digest([ex.id for ex in examples]),
            "max_length": max_length}
    extra = {"p_words": {"word_ids": list(spec.word_ids)}, "layer": {"layer": spec.layer}}
    tables = {k: store.table(task.name, split, k, {**base, **extra.get(k, {})}) for k in spec.kinds}
    done = {k: t.done for k, t in tables.items()}
    start = min(done.values())
    if progress:
        progress(start)
    while start < len(examples):
        todo = tuple(k for k in spec.kinds if done[k] == start)
        chunk = prompts[start:start + chunk_rows]
        feats = extract(model, encoder, chunk, FeatureSpec(todo, spec.word_ids, spec.layer), batch_size)
        for k in todo:
            tables[k].append(feats[k])
            done[k] += len(chunk)
        start = min(done.values())
        if progress:
            progress(len(chunk))
    return {k: t.load() for k, t in tables.items()}
