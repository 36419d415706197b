"""Batched perturbation forwards: K losses from one vmapped forward equal K sequential forwards
(LoRA and prefix, classification and generation losses), and FZOO with batched=True takes the
same steps as sequential FZOO and replays bit for bit."""

import copy

import pytest
import torch

from ftlab.config import LoraSettings, PrefixSettings
from ftlab.errors import FtlabError
from ftlab.models import prepare_model
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec
from ftlab.zo.batched import BatchedObjective, batched_losses, batched_objective
from ftlab.zo.fzoo import FZOO

SENTENCES = ["the movie was great", "a boring and bad story", "good acting, fine plot"]


def _trainable(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _prepared(tiny_model_factory, mode, dtype=torch.float32):
    model = tiny_model_factory("llama").to(dtype)
    module = prepare_model(model, mode, lora=LoraSettings(r=4), prefix=PrefixSettings())
    with torch.no_grad():  # LoRA's B starts at zero: make every adapter matter
        gen = torch.Generator().manual_seed(0)
        for p in _trainable(module).values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _objective(module, tiny_tokenizer, kind):
    if kind == "classification":
        spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
        examples = [Example(id=f"t:{i}", fields={"text": s}, label=i % 2) for i, s in enumerate(SENTENCES)]
    else:
        spec = TaskSpec(name="qa", template="Q: {text} A:", metric="f1")
        examples = [Example(id=f"q:{i}", fields={"text": s}, answers=[s.split()[-1]]) for i, s in enumerate(SENTENCES)]
    return batched_objective(module, Encoder(tiny_tokenizer, spec), examples, "cpu")


@torch.no_grad()
def _sequential(module, objective, stacked):
    """The K losses one forward at a time, each setting loaded into the parameters."""
    params, out = _trainable(module), []
    saved = {n: p.clone() for n, p in params.items()}
    for k in range(next(iter(stacked.values())).shape[0]):
        for name, t in stacked.items():
            params[name].copy_(t[k])
        out.append(objective())
    for name, t in saved.items():
        params[name].copy_(t)
    return torch.stack(out)


@pytest.mark.parametrize("mode,kind,dtype", [("lora", "classification", torch.float32),
                                             ("lora", "generation", torch.float32),
                                             ("lora", "classification", torch.float64),
                                             ("prefix", "generation", torch.float64)])
def test_batched_losses_equal_sequential_forwards(tiny_model_factory, tiny_tokenizer, mode, kind, dtype):
    module = _prepared(tiny_model_factory, mode, dtype)
    objective = _objective(module, tiny_tokenizer, kind)
    gen = torch.Generator().manual_seed(1)
    k = 5
    with torch.no_grad():
        stacked = {n: p[None] + 0.05 * torch.randn((k, *p.shape), generator=gen, dtype=dtype)
                   for n, p in _trainable(module).items()}
        before = {n: p.clone() for n, p in _trainable(module).items()}
        got = objective.losses(stacked)
    want = _sequential(module, objective, stacked)
    assert got.shape == (k,) and len(set(got.tolist())) == k  # the settings give different losses
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert all(torch.equal(p, before[n]) for n, p in _trainable(module).items())  # theta is not moved
    assert all(p.grad is None for p in module.parameters())


def test_the_unperturbed_setting_is_the_plain_closure(tiny_model_factory, tiny_tokenizer):
    module = _prepared(tiny_model_factory, "lora", torch.float64)
    objective = _objective(module, tiny_tokenizer, "classification")
    with torch.no_grad():
        stacked = {n: p[None].clone() for n, p in _trainable(module).items()}
        assert float(objective.losses(stacked)[0]) == pytest.approx(float(objective()), rel=1e-13)


def test_bad_stacks_are_one_line_errors(tiny_model_factory, tiny_tokenizer):
    module = _prepared(tiny_model_factory, "lora")
    loss_fn = _objective(module, tiny_tokenizer, "classification").loss_fn
    params = _trainable(module)
    first, second = list(params)[:2]
    with pytest.raises(FtlabError, match="^batched_losses: 'nope' is not a parameter of the model$"):
        batched_losses(module, {"nope": torch.zeros(2, 3)}, loss_fn)
    with pytest.raises(FtlabError, match=r"^batched_losses: stacked tensors must share their first \(K\) size"):
        batched_losses(module, {first: params[first][None].expand(2, -1, -1),
                                second: params[second][None].expand(3, -1, -1)}, loss_fn)
    with pytest.raises(FtlabError, match="is not a parameter of the batched objective's model"):
        BatchedObjective(module, loss_fn).name_of(torch.nn.Parameter(torch.zeros(1)))


def _fzoo(module, batched, seed=5, cls=FZOO, **kw):
    return cls([p for p in module.parameters() if p.requires_grad], lr=1e-2, eps=1e-2, n_perturbations=4,
               weight_decay=0.01, exact=True, batched=batched, seed=seed, **kw)  # exact: theta never moves either


def test_batched_lowrank_fzoo_takes_the_sequential_steps(tiny_model_factory, tiny_tokenizer):
    """ftlab's own estimator batches its N + 1 low-rank points the same way."""
    from ftlab.zo.own import LowRankFZOO

    module = _prepared(tiny_model_factory, "lora", torch.float64)
    twin = copy.deepcopy(module)
    batched = _fzoo(module, True, cls=LowRankFZOO, rank=2, refresh_every=2)
    sequential = _fzoo(twin, False, cls=LowRankFZOO, rank=2, refresh_every=2)
    sequential.attach(twin)
    objective, plain = _objective(module, tiny_tokenizer, "generation"), _objective(twin, tiny_tokenizer, "generation")
    for _ in range(3):  # across a refresh of V
        assert float(batched.step(objective)) == pytest.approx(float(sequential.step(plain)), rel=1e-7)
        got, want = batched.history[-1], sequential.history[-1]
        assert got.seeds == want.seeds and got.grads == pytest.approx(want.grads, rel=1e-6, abs=1e-9)
    for (name, p), q in zip(_trainable(module).items(), _trainable(twin).values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8, msg=name)


def test_batched_fzoo_takes_the_sequential_steps(tiny_model_factory, tiny_tokenizer):
    module = _prepared(tiny_model_factory, "lora", torch.float64)
    twin = copy.deepcopy(module)
    batched, sequential = _fzoo(module, True), _fzoo(twin, False)
    sequential.attach(twin)
    objective, plain = _objective(module, tiny_tokenizer, "generation"), _objective(twin, tiny_tokenizer, "generation")
    for _ in range(2):
        loss = batched.step(objective)
        assert float(loss) == pytest.approx(float(sequential.step(plain)), rel=1e-7)
        got, want = batched.history[-1], sequential.history[-1]
        assert got.seeds == want.seeds and got.grads == pytest.approx(want.grads, rel=1e-6, abs=1e-9)
    assert batched.cost() == ("FZOO: 1 batched forward of 5 copies of the batch a step, "
                              "0 extra bytes per trainable entry")
    for (name, p), q in zip(_trainable(module).items(), _trainable(twin).values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8, msg=name)


def test_batched_fzoo_replays_bitwise_and_learns(tiny_model_factory, tiny_tokenizer):
    module = _prepared(tiny_model_factory, "lora")  # float32
    base = copy.deepcopy(module)
    opt = _fzoo(module, True)
    objective = _objective(module, tiny_tokenizer, "classification")
    start = float(objective())
    for _ in range(15):
        opt.step(objective)
    assert float(objective()) < start
    replayer = _fzoo(base, True, seed=999)
    for record in opt.history:
        replayer.replay(record)
    for p, q in zip(module.parameters(), base.parameters()):
        assert torch.equal(p, q)
