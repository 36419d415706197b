"""Per-example gradient features: the LoRA hook path and vmap against a naive loop, the Adam formula by hand, skipping
examples without response tokens, projection + normalisation, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.grads.projection import ProjectionSpec, Projector
from ftlab.models import trainable_parameters
from ftlab.select.data import InstructionExample, collate, encode
from ftlab.select.datastore import Datastore
from ftlab.select.features import (
    AdamState,
    adam_precondition,
    collect_features,
    feature_blocks,
    per_example_grads,
    vmap_per_example_grads,
)
from ftlab.select.warmup import response_loss

from less_fixtures import tiny_lora

TEXTS = [("The movie was", " great"), ("A terrible plot, bad acting and a boring story. It was", " bad"),
         ("Question: is fire cold?", " no it is not, the sky is blue"), ("It was", " good and the story was great")]


def _examples(texts=TEXTS) -> list[InstructionExample]:
    return [InstructionExample(f"f:{i + 1}", ({"role": "user", "content": p},), r, "t", "t")
            for i, (p, r) in enumerate(texts)]


def _loop_grads(module, rows, pad) -> list[dict[str, torch.Tensor]]:
    """Reference: one unpadded example at a time, plain autograd."""
    out = []
    for row in rows:
        module.zero_grad(set_to_none=True)
        response_loss(module, collate([row], pad)).backward()
        out.append({n: p.grad.clone() for n, p in trainable_parameters(module)})
    return out


@pytest.mark.parametrize("path", ["lora hooks", "vmap"])
@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa")])
def test_batched_grads_equal_a_naive_loop_with_padding(tiny_model_factory, tiny_tokenizer, arch, attn, path):
    module = tiny_lora(tiny_model_factory(arch), torch.float64, attn)
    rows = [encode(tiny_tokenizer, ex, 64) for ex in _examples()]
    assert len({len(ids) for ids, _ in rows}) > 1  # the batch needs padding
    # gemma3's sliding window is 8 tokens: the longest row exercises the sliding-window mask.
    assert max(len(ids) for ids, _ in rows) > 8
    compute = per_example_grads if path == "lora hooks" else vmap_per_example_grads
    batched = compute(module, collate(rows, tiny_tokenizer.pad_token_id))
    # SDPA computes in float64 throughout; eager takes its softmax in float32 (transformers' choice).
    rtol, atol = (1e-9, 1e-12) if attn == "sdpa" else (1e-4, 1e-8)
    for i, ref in enumerate(_loop_grads(module, rows, tiny_tokenizer.pad_token_id)):
        for name, g in ref.items():
            assert g.abs().max() > 0 and torch.isfinite(batched[name][i]).all()
            torch.testing.assert_close(batched[name][i], g, rtol=rtol, atol=atol)


def test_adam_feature_matches_a_hand_computation():
    g = torch.tensor([[0.3, -2.0, 0.0]], dtype=torch.float64)
    m, v = torch.tensor([0.1, 0.5, -0.2], dtype=torch.float64), torch.tensor([0.04, 1.0, 0.01], dtype=torch.float64)
    b1, b2, eps = 0.9, 0.999, 1e-8
    got = adam_precondition(g, m, v, (b1, b2), eps)[0].tolist()
    for j in range(3):
        mj = b1 * m[j].item() + (1 - b1) * g[0, j].item()
        vj = b2 * v[j].item() + (1 - b2) * g[0, j].item() ** 2
        assert got[j] == pytest.approx(mj / math.sqrt(vj + eps), rel=1e-12)


def test_feature_blocks_use_each_tensors_own_moments(tiny_model, tiny_tokenizer):
    module = tiny_lora(tiny_model, torch.float64)
    grads = per_example_grads(module, collate([encode(tiny_tokenizer, ex, 64) for ex in _examples()[:2]],
                                              tiny_tokenizer.pad_token_id))
    gen = torch.Generator().manual_seed(0)
    moments = {n: (torch.randn(g.shape[1:], generator=gen, dtype=torch.float64),
                   torch.rand(g.shape[1:], generator=gen, dtype=torch.float64)) for n, g in grads.items()}
    blocks = feature_blocks(grads, "adam", AdamState(moments, (0.9, 0.99), 1e-6))
    for block, (name, g) in zip(blocks, grads.items()):
        m, v = moments[name]
        ref = (0.9 * m + 0.1 * g) / torch.sqrt(0.99 * v + 0.01 * g**2 + 1e-6)
        torch.testing.assert_close(block, ref.reshape(len(g), -1))
    plain = feature_blocks(grads, "sgd")
    torch.testing.assert_close(plain[0], next(iter(grads.values())).reshape(2, -1))
    with pytest.raises(FtlabError, match="AdamW moments"):
        feature_blocks(grads, "adam", AdamState({}))
    with pytest.raises(FtlabError, match="unknown gradient type"):
        feature_blocks(grads, "rmsprop")


def test_store_holds_normalised_projections_and_skips_empty_responses(tmp_path, tiny_model, tiny_tokenizer):
    module = tiny_lora(tiny_model)
    examples = _examples(TEXTS + [("No answer here", "")])
    dim_in = sum(p.numel() for _, p in trainable_parameters(module))
    projector = Projector(ProjectionSpec(dim_in=dim_in, dim_out=128, seed=3))
    result = collect_features(module, tiny_tokenizer, examples, tmp_path / "store", grad_type="sgd",
                              projector=projector, model_name="tiny", checkpoint="epoch-1", batch_size=3,
                              dtype="float32", progress=False)
    assert result.skipped == ["f:5"]
    store = result.store
    assert sorted(store.ids) == ["f:1", "f:2", "f:3", "f:4"]
    feats = store.read(0, len(store))
    assert np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    by_id = {ex.id: ex for ex in examples}
    for row, id_ in enumerate(store.ids):  # each row: the projected, normalised gradient of its example
        ref = _loop_grads(module, [encode(tiny_tokenizer, by_id[id_], 256)], tiny_tokenizer.pad_token_id)[0]
        proj = projector.project_blocks([g.reshape(1, -1) for g in ref.values()])[0]
        np.testing.assert_allclose(feats[row], (proj / proj.norm()).numpy(), rtol=1e-4, atol=1e-5)


def test_killed_pass_resumes_without_recomputing(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    module = tiny_lora(tiny_model)
    examples = _examples()
    dim_in = sum(p.numel() for _, p in trainable_parameters(module))
    kw = dict(grad_type="sgd", projector=Projector(ProjectionSpec(dim_in=dim_in, dim_out=64)), model_name="tiny",
              checkpoint="epoch-1", batch_size=1, shard_rows=1, dtype="float32", progress=False)
    full = collect_features(module, tiny_tokenizer, examples, tmp_path / "full", **kw).store

    import ftlab.select.features as features

    calls = []
    real = features.per_example_grads

    def dying(module, batch):
        calls.append(len(batch.input_ids))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while computing the third example
        return real(module, batch)

    monkeypatch.setattr(features, "per_example_grads", dying)
    with pytest.raises(KeyboardInterrupt):
        collect_features(module, tiny_tokenizer, examples, tmp_path / "cut", **kw)
    calls.clear()
    monkeypatch.setattr(features, "per_example_grads", lambda m, b: (calls.append(1), real(m, b))[1])
    resumed = collect_features(module, tiny_tokenizer, examples, tmp_path / "cut", **kw).store
    assert len(calls) == 2  # only the two examples not yet written
    assert resumed.ids == full.ids
    np.testing.assert_array_equal(resumed.read(0, 4), Datastore.open(tmp_path / "full").read(0, 4))
