"""Points of weight space evaluated on shared batches: grouped (LoRA) forwards, paths, barriers."""

import random

import numpy as np
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.models import LoraSettings, prepare_model, trainable_parameters
from ftlab.seeds import interpolation_barrier
from ftlab.seeds.basins import barrier_matrix_from_means
from ftlab.seeds.paths import PointEvaluator, mix, path_results
from ftlab.tasks import Example, TaskSpec

SPEC = TaskSpec(name="cue", template="{text} It was", options=[" terrible", " great"])
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def cue_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    words = ["the", "movie", "story", "was", "a", "film", "and", "plot"]
    return [Example(id=f"cue:{i}",
                    fields={"text": " ".join(rng.sample(words, 1 + i % 4) + [["terrible", "great"][i % 2]])},
                    label=i % 2) for i in range(n)]


@pytest.fixture
def lora_points(tiny_model_factory):
    """A tiny Llama with LoRA (r=2) and three random points of its adapter tensors."""
    module = prepare_model(tiny_model_factory("llama"), "lora", lora=LoraSettings(r=2))
    base = {n: p.detach().clone() for n, p in trainable_parameters(module)}
    points = []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        points.append({n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in base.items()})
    return module, points


def test_grouped_forward_equals_one_point_at_a_time(lora_points, tiny_tokenizer):
    module, points = lora_points
    sets = {"train": cue_examples(21)}
    one = PointEvaluator(module, tiny_tokenizer, SPEC, sets, batch_size=8, group=1)
    grouped = PointEvaluator(module, tiny_tokenizer, SPEC, sets, batch_size=8, group=3)
    assert grouped.group == 3 and one.group == 1
    for a, b in zip(one.evaluate_many(points, "train"), grouped.evaluate_many(points, "train")):
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        assert np.array_equal(a.correct, b.correct)
    # Against the model's own forward with the point loaded, one example at a time.
    one.load(points[1])
    from ftlab import objectives

    with torch.no_grad():
        for i, ex in enumerate(sets["train"][:4]):
            batch = objectives.training_batch(one.encoder, [ex])
            ref = float(objectives.loss(module, batch, one.encoder.option_ids))
            assert grouped.evaluate(points[1], "train").loss[i] == pytest.approx(ref, rel=1e-5)


def test_barrier_of_a_model_with_itself_is_zero_and_paths_are_symmetric(lora_points, tiny_tokenizer):
    module, (a, b, _) = lora_points
    ev = PointEvaluator(module, tiny_tokenizer, SPEC, {"train": cue_examples(16)}, batch_size=8)
    self_path = [r.mean()["loss"] for r in path_results(ev, a, a, ALPHAS, "train")]
    assert interpolation_barrier(ALPHAS, self_path, higher_is_better=False) == 0.0
    assert len(set(self_path)) == 1  # every point of the path is the model itself
    forward = path_results(ev, a, b, ALPHAS, "train")
    backward = path_results(ev, b, a, ALPHAS, "train")
    for f, r in zip(forward, backward[::-1]):
        np.testing.assert_allclose(f.loss, r.loss, rtol=1e-6)
    fl, bl = [r.mean()["loss"] for r in forward], [r.mean()["loss"] for r in backward]
    assert interpolation_barrier(ALPHAS, fl, False) == pytest.approx(interpolation_barrier(ALPHAS, bl, False), abs=1e-7)
    # The endpoints of a path are the runs' own evaluations, reused when given.
    ends = (ev.evaluate(a, "train"), ev.evaluate(b, "train"))
    assert np.array_equal(path_results(ev, a, b, ALPHAS, "train", ends)[0].loss, ends[0].loss)
    assert all(torch.equal(mix(a, b, 0.0)[n], a[n]) and torch.equal(mix(a, b, 1.0)[n], b[n]) for n in a)


def test_vectorised_barrier_matrix_matches_the_scalar_barrier():
    rng = np.random.default_rng(0)
    means = rng.uniform(0, 2, size=(4, 4, len(ALPHAS)))
    m = barrier_matrix_from_means(means, np.array(ALPHAS), higher_is_better=False)
    for i in range(4):
        for j in range(4):
            want = 0.0 if i == j else interpolation_barrier(ALPHAS, means[i, j], higher_is_better=False)
            assert m[i, j] == pytest.approx(want)
    acc = barrier_matrix_from_means(means, np.array(ALPHAS), higher_is_better=True)
    assert acc[0, 1] == pytest.approx(interpolation_barrier(ALPHAS, means[0, 1], higher_is_better=True))


def test_points_of_another_trainable_set_are_refused(lora_points, tiny_tokenizer):
    module, (a, _, _) = lora_points
    ev = PointEvaluator(module, tiny_tokenizer, SPEC, {"train": cue_examples(4)})
    with pytest.raises(FtlabError, match="do not match"):
        ev.check_point({k: v for k, v in list(a.items())[1:]}, "run x")
    name = next(iter(a))
    with pytest.raises(FtlabError, match="shape"):
        ev.check_point({**a, name: torch.zeros(3, 3)}, "run y")


def test_full_fine_tuning_falls_back_to_one_point_per_forward(tiny_model_factory, tiny_tokenizer):
    module = prepare_model(tiny_model_factory("llama"), "full")
    ev = PointEvaluator(module, tiny_tokenizer, SPEC, {"train": cue_examples(4)}, group=4)
    assert ev.linears is None and ev.group == 1


def test_frozen_bottom_layers_run_once_and_change_nothing(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    top = model.config.num_hidden_layers - 1
    assert top >= 1
    module = prepare_model(model, "lora", lora=LoraSettings(r=2, target_modules=[f"layers.{top}.self_attn.q_proj",
                                                                                  f"layers.{top}.self_attn.v_proj"]))
    base = {n: p.detach().clone() for n, p in trainable_parameters(module)}
    points = [{n: t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(s)) for n, t in base.items()}
              for s in range(3)]
    sets = {"train": cue_examples(13), "ood": cue_examples(5, seed=1)}
    plain = PointEvaluator(module, tiny_tokenizer, SPEC, sets, batch_size=4, group=1, cache_bottom=False)
    assert plain.bottom is None
    want = {name: plain.evaluate_many(points, name) for name in sets}
    calls = []
    layer0 = next(m for n, m in module.named_modules() if n.endswith("layers.0"))
    handle = layer0.register_forward_hook(lambda *a: calls.append(1))
    cached = PointEvaluator(module, tiny_tokenizer, SPEC, sets, batch_size=4, group=3)
    assert cached.bottom is not None and cached.bottom.first == top
    captured = len(calls)
    assert captured == 4 + 2  # once per fixed batch while caching
    for group in (1, 3):
        cached.group = group
        for name in sets:
            for a, b in zip(want[name], cached.evaluate_many(points, name)):
                np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)
                assert np.array_equal(a.correct, b.correct)
    assert len(calls) == captured  # the bottom layer never ran again
    handle.remove()
    # The model is whole again afterwards: its own forward equals the uncached evaluator.
    assert all(type(m).__name__ != "_Passthrough" for m in module.modules())
    # A trainable tensor outside the decoder layers (or in layer 0) means nothing can be skipped.
    full = prepare_model(tiny_model_factory("llama"), "lora", lora=LoraSettings(r=2))
    assert PointEvaluator(full, tiny_tokenizer, SPEC, {"train": cue_examples(4)}).bottom is None
