"""Gradient accumulation: a step over grad_accum equal micro-batches (evaluated one after the
other) equals the same step on the whole batch, for zeroth- and first-order optimizers (float64,
GPT-2: its layers really run in float64); micro-batches pad to their own longest prompt."""

import copy

import pytest
import torch

from ftlab import objectives
from ftlab.errors import FtlabError
from ftlab.objectives import Encoder
from ftlab.parallel import micro_batches
from ftlab.tasks.base import Example, TaskSpec
from ftlab.train import make_closure
from ftlab.zo import MeZO, ZOAdam

SPEC = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
TEXTS = ["the movie was great", "a story", "the film and the acting and the story were good", "it",
         "the acting was bad and the film was long", "good", "the story was a film", "bad bad"]
EXAMPLES = [Example(id=f"e:{i}", fields={"text": t}, label=i % 2) for i, t in enumerate(TEXTS)]


def _parts(model, tokenizer, k):
    enc = Encoder(tokenizer, SPEC)
    return [objectives.objective_fn("loss", model, tokenizer, enc, micro, "cpu")
            for micro in micro_batches(EXAMPLES, k)]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("cls", [MeZO, ZOAdam])
def test_zeroth_order_step_on_micro_batches_equals_the_whole_batch(tiny_model_factory, tiny_tokenizer, k, cls):
    whole_model = tiny_model_factory("gpt2").double()
    micro_model = copy.deepcopy(whole_model)
    kw = dict(lr=1e-3, eps=1e-4, seed=5, n_perturbations=2, chunk_size=500)
    whole, micro = cls(whole_model.parameters(), **kw), cls(micro_model.parameters(), **kw)
    for _ in range(3):
        a = whole.step(make_closure(whole, _parts(whole_model, tiny_tokenizer, 1), None))
        b = micro.step(make_closure(micro, _parts(micro_model, tiny_tokenizer, k), None))
        assert float(a) == pytest.approx(float(b), rel=1e-12)
        assert micro.history[-1].grads == pytest.approx(whole.history[-1].grads, rel=1e-6)
    for p, q in zip(whole_model.parameters(), micro_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 8])
def test_first_order_accumulated_gradients_equal_the_whole_batch(tiny_model_factory, tiny_tokenizer, k):
    whole_model = tiny_model_factory("gpt2").double()
    micro_model = copy.deepcopy(whole_model)
    whole = torch.optim.SGD(whole_model.parameters(), lr=0.1)
    micro = torch.optim.SGD(micro_model.parameters(), lr=0.1)
    for _ in range(2):
        a = whole.step(make_closure(whole, _parts(whole_model, tiny_tokenizer, 1), max_grad_norm=1.0))
        b = micro.step(make_closure(micro, _parts(micro_model, tiny_tokenizer, k), max_grad_norm=1.0))
        assert float(a) == pytest.approx(float(b), rel=1e-12)
        for p, q in zip(whole_model.parameters(), micro_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-13)
    for p, q in zip(whole_model.parameters(), micro_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_a_zeroth_order_closure_holds_one_micro_batch_at_a_time():
    """Each micro-batch's objective runs and returns before the next starts."""
    events = []

    def part(i):
        def run():
            events.append(("start", i))
            out = torch.tensor(float(i))
            events.append(("end", i))
            return out
        return run
    closure = make_closure(MeZO([torch.nn.Parameter(torch.zeros(3))]), [part(i) for i in range(3)], None)
    assert float(closure()) == pytest.approx(1.0)
    assert events == [(e, i) for i in range(3) for e in ("start", "end")]


def test_grad_accum_must_divide_the_batch():
    from ftlab.config import TrainConfig, load_config

    with pytest.raises(FtlabError, match=r"config.grad_accum: 3 does not divide batch_size=8"):
        load_config(TrainConfig, None, ["grad_accum=3", "batch_size=8"])
    with pytest.raises(FtlabError, match="cannot be cut into grad_accum=3"):
        micro_batches(list(range(4)), 3)
