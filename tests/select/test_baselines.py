"""Baselines: seeded random scores; representation similarity against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.select.baselines import mean_hidden, random_scores, representation_scores, representation_store
from ftlab.select.data import InstructionExample, encode


def _examples(texts, prefix="f", tasks=None) -> list[InstructionExample]:
    return [InstructionExample(f"{prefix}:{i + 1}", ({"role": "user", "content": p},), r,
                               tasks[i] if tasks else "t", "t") for i, (p, r) in enumerate(texts)]


POOL = [("The movie was", " great"), ("A terrible plot, bad acting and a boring story. It was", " bad"),
        ("Question: is fire cold?", " no"), ("It was", " good and the story was great"), ("Is the sky blue?", " yes")]
TARGETS = [("Is the film good?", " yes"), ("Is the plot bad?", " no"), ("The acting was", " terrible")]


def test_random_scores_are_seeded():
    a, b, c = random_scores(100, 0), random_scores(100, 0), random_scores(100, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and ((0 <= a) & (a < 1)).all()
    assert len(set(np.argsort(-a)[:10]) & set(np.argsort(-c)[:10])) < 10


def test_mean_hidden_equals_unpadded_reference(tiny_model, tiny_tokenizer):
    model = tiny_model.double()
    seqs = [encode(tiny_tokenizer, ex, 64)[0] for ex in _examples(POOL)]
    batched = mean_hidden(model, seqs, tiny_tokenizer.pad_token_id)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(batched[i], hidden.mean(0).float(), rtol=1e-5, atol=1e-6)


def test_representation_scores_match_a_dense_reference(tmp_path, tiny_model, tiny_tokenizer):
    pool, targets = _examples(POOL), _examples(TARGETS, "t", tasks=["qa", "qa", "review"])
    kw = dict(model_name="tiny", batch_size=2, max_length=64, progress=False)
    pool_store = representation_store(tiny_model, tiny_tokenizer, pool, tmp_path / "pool", **kw)
    target_store = representation_store(tiny_model, tiny_tokenizer, targets, tmp_path / "target", **kw)
    assert pool_store.ids == [ex.id for ex in pool]
    scores = representation_scores(pool_store, target_store, ["qa", "qa", "review"])
    x, t = pool_store.read(0, 5).astype(np.float64), target_store.read(0, 3).astype(np.float64)
    cos = np.array([[xi @ tj / np.linalg.norm(xi) / np.linalg.norm(tj) for tj in t] for xi in x])
    ref = np.maximum(cos[:, :2].mean(1), cos[:, 2])
    np.testing.assert_allclose(scores, ref, rtol=1e-5)
    with pytest.raises(FtlabError):
        representation_scores(pool_store, target_store, ["qa"])  # one group label per target
