"""LOZO and LOZO-M (low-rank perturbations U V^T, V refreshed lazily): the estimate on a quadratic
(unbiased, its second moment against the rank, the subspace it stays in while V is fixed), naive
float64 references with U and V materialised, bitwise replay and state_dict round trips across
V refreshes, learning on a tiny LoRA model, and bad settings."""

import copy
import math
import random

import pytest
import torch
from reference import f32, projected_grads, z_of

from ftlab import objectives
from ftlab.config import LoraSettings
from ftlab.errors import FtlabError
from ftlab.models import prepare_model
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec
from ftlab.zo.directions import param_seed
from ftlab.zo.lozo import LOZO, LOZOM

CLASSES = {"lozo": (LOZO, {}), "lozo-m": (LOZOM, {"momentum": 0.8})}


# -- the estimate on a quadratic f(X) = 0.5 ||X - A||^2 (gradient G = X - A) --------------------
def _estimates(rank, refresh_every, steps, m=12, n=10, seed=0):
    """The per-step estimates ``(X_before - X_after) / lr`` of LOZO at a fixed X (reset each step)."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    a = torch.randn(m, n, generator=gen, dtype=torch.float64)
    x = torch.nn.Parameter(x0.clone())
    lr = 1e-3
    opt = LOZO([x], lr=lr, eps=1e-3, rank=rank, refresh_every=refresh_every, seed=seed)
    out = []
    for _ in range(steps):
        opt.step(lambda: 0.5 * (x - a).pow(2).sum())
        out.append((x0 - x.detach()) / f32(lr))
        x.data.copy_(x0)
    return torch.stack(out), x0 - a, opt


def test_estimate_is_unbiased_when_v_is_resampled():
    est, g, _ = _estimates(rank=2, refresh_every=1, steps=3000)
    mean = est.mean(0)
    cosine = float((mean * g).sum() / (mean.norm() * g.norm()))
    assert cosine > 0.9
    # per-step second moment ~ (m+2)(n+2)|G|^2 at most: the mean of 3000 is within ~0.25 |G|
    assert float((mean - g).norm() / g.norm()) < 0.35


def test_estimate_stays_in_the_subspace_while_v_is_fixed():
    est, g, opt = _estimates(rank=3, refresh_every=10_000, steps=1500)
    x = opt.param_groups[0]["params"][0]
    v = opt._V(0, x).double()
    projector = v @ torch.linalg.pinv(v)  # onto V's columns (n x n)
    outside = est - est @ projector
    assert float(outside.abs().max()) < 1e-9 * float(est.abs().max())  # every step: rows in span(V)
    expected = g @ v @ v.T / 3  # E_U[estimate] with V fixed: G V V^T / r
    mean = est.mean(0)
    assert float((mean * expected).sum() / (mean.norm() * expected.norm())) > 0.9
    assert float((mean * g).sum()) > 0  # still a descent direction


def test_second_moment_falls_with_the_rank_towards_mezo():
    """E|g U V^T / r|^2 = (m+2)(n+2)|G|^2 at rank 1, decreasing towards MeZO's (mn+2)|G|^2."""
    m, n = 12, 10
    moments = {}
    for rank in (1, 8):
        est, g, _ = _estimates(rank=rank, refresh_every=1, steps=2500, m=m, n=n)
        moments[rank] = float(est.pow(2).sum((1, 2)).mean() / g.pow(2).sum())
    assert moments[1] == pytest.approx((m + 2) * (n + 2), rel=0.2)
    assert m * n < moments[8] < moments[1]


# -- naive float64 references: U, V, Z = U V^T and N materialised -------------------------------
def _factor(seed, index, rows, rank):
    gen = torch.Generator().manual_seed(param_seed(seed, index))
    return torch.randn(rows, rank, generator=gen).double()  # drawn in float32, as documented


def _v_seed(seed, k):
    return random.Random(f"lozo-v/{seed}/{k}").getrandbits(32)


class RefLOZO:
    def __init__(self, params, rank, refresh_every, seed, chunk, generator, momentum=None):
        self.params, self.r, self.nu, self.seed = params, rank, refresh_every, seed
        self.chunk, self.generator, self.beta = chunk, generator, momentum
        self.t, self.n_buf, self.m_buf = 0, {}, {}

    def V(self, i, k):
        return _factor(_v_seed(self.seed, k), i, self.params[i].shape[1], self.r)

    def step(self, loss_fn, seeds, lr, eps, wd_of):
        lr, k = f32(lr), self.t // self.nu
        if self.beta is not None and self.t % self.nu == 0 and self.t > 0:
            for i in self.n_buf:  # carry the momentum into the new subspace
                self.n_buf[i] = self.n_buf[i] @ (self.V(i, k - 1).T @ self.V(i, k)) / self.params[i].shape[1]
        self.t += 1
        us = [{i: _factor(s, i, p.shape[0], self.r) for i, p in enumerate(self.params) if p.ndim == 2} for s in seeds]
        zs = [[us[j][i] @ self.V(i, k).T if p.ndim == 2 else z_of(p, s, i, self.chunk, generator=self.generator)
               for i, p in enumerate(self.params)] for j, s in enumerate(seeds)]
        grads = projected_grads(self.params, loss_fn, zs, eps)
        n = len(seeds)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.sub_(lr * wd_of(p) * p)
                if self.beta is None:  # LOZO: lr (1/n) sum g Z / r (matrices), MeZO's update (vectors)
                    scale = self.r if p.ndim == 2 else 1
                    p.sub_(lr * sum(g * z[i] for g, z in zip(grads, zs)) / n / scale)
                elif p.ndim == 2:
                    fresh = sum(g * u[i] for g, u in zip(grads, us)) / n
                    self.n_buf[i] = self.beta * self.n_buf.get(i, 0.0) + (1 - self.beta) * fresh
                    p.sub_(lr / self.r * self.n_buf[i] @ self.V(i, k).T)
                else:
                    d = sum(g * z[i] for g, z in zip(grads, zs)) / n
                    self.m_buf[i] = self.beta * self.m_buf.get(i, 0.0) + (1 - self.beta) * d
                    p.sub_(lr * self.m_buf[i])
        return grads


def _groups(model, wd):
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("n,exact,generator", [(1, False, "strided"), (2, False, "torch"), (2, True, "strided")])
def test_matches_a_naive_reference(tiny_model_factory, tiny_tokenizer, name, n, exact, generator):
    model = tiny_model_factory("llama").double()
    ref_model = copy.deepcopy(model)
    ids = torch.tensor([tiny_tokenizer("the movie was great and the story was good")["input_ids"]])
    cls, kwargs = CLASSES[name]
    chunk, wd, lr, eps = 1000, 0.1, 1e-2, 1e-3
    opt = cls(_groups(model, wd), lr=lr, eps=eps, n_perturbations=n, rank=3, refresh_every=2, seed=5,
              generator=generator, chunk_size=chunk, exact=exact, **kwargs)
    opt.attach(model)
    ref_params = [q for g in _groups(ref_model, wd) for q in g["params"]]
    decayed = {id(q) for q in ref_params if q.ndim >= 2}
    ref = RefLOZO(ref_params, 3, 2, 5, chunk, generator, kwargs.get("momentum"))

    def loss(m):
        return lambda: float(m(input_ids=ids, labels=ids).loss)

    for _ in range(5):  # V refreshes before steps 2 and 4
        opt.step(loss(model))
        record = opt.history[-1]
        want = ref.step(loss(ref_model), record.seeds, lr, eps, lambda p: wd if id(p) in decayed else 0.0)
        assert record.grads == pytest.approx(want, rel=1e-6, abs=1e-9)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(opt_params, ref_params)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        if name == "lozo-m":
            want = ref.n_buf[i] if p.ndim == 2 else ref.m_buf[i]
            torch.testing.assert_close(opt.state[p]["momentum"], want, rtol=1e-9, atol=1e-12)
    assert bool(opt.state) == (name == "lozo-m")


# -- replay, checkpoints ------------------------------------------------------------------------
def _run(model, opt, steps, ids):
    for _ in range(steps):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)


def _same_state(a, b):
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for p, q in zip(pa, pb):
        assert a.state[p].keys() == b.state[q].keys()
        for key, value in a.state[p].items():
            assert torch.equal(value, b.state[q][key]), key


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", CLASSES)
def test_replay_is_bitwise_across_v_refreshes(tiny_model_factory, name, exact):
    model = tiny_model_factory("llama")  # float32: in-place moves round, a replay must round alike
    base = copy.deepcopy(model)
    ids = torch.arange(2, 30)[None]
    cls, kwargs = CLASSES[name]
    common = dict(lr=1e-3, eps=1e-3, n_perturbations=2, rank=2, refresh_every=2, exact=exact, seed=3, **kwargs)
    opt = cls(_groups(model, 0.01), **common)
    opt.attach(model)
    _run(model, opt, 5, ids)
    replayer = cls(_groups(base, 0.01), **common)
    for record in opt.history:  # as ftlab.zo.trajectory.replay does
        assert replayer.draw_seeds() == record.seeds
        replayer.replay(record)
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)
    _same_state(opt, replayer)
    assert replayer.state_dict()["lozo"] == opt.state_dict()["lozo"] == {"step": 5, "v_seed": 3}


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_round_trip_continues_identically(tiny_model_factory, name):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 30)[None]
    cls, kwargs = CLASSES[name]
    check_round_trip(model, ids, cls, dict(lr=1e-3, eps=1e-3, rank=2, refresh_every=2, **kwargs))


def check_round_trip(model, ids, cls, common):
    """Three steps, a state_dict into an optimizer with another seed, three more steps on each
    (a refresh of V at step 4, carrying the momentum over): the same weights and state."""
    opt = cls(model.parameters(), seed=4, **common)
    _run(model, opt, 3, ids)
    saved, copy_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model)
    _run(model, opt, 3, ids)
    fresh = cls(copy_model.parameters(), seed=99, **common)
    fresh.load_state_dict(saved)
    _run(copy_model, fresh, 3, ids)
    for p, q in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(p, q)
    _same_state(opt, fresh)


@pytest.mark.parametrize("name", CLASSES)
def test_a_skipped_step_only_restores(tiny_model_factory, name):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 30)[None]
    cls, kwargs = CLASSES[name]
    opt = cls(model.parameters(), lr=1e-3, eps=1e-3, rank=2, seed=0, **kwargs)
    _run(model, opt, 1, ids)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    assert math.isnan(float(opt.step(lambda: torch.tensor(float("nan")))))
    for p, w in zip(model.parameters(), weights):  # +eps -2eps +eps rounds in float32
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i in state for k, v in state[i].items())


# -- learning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLASSES)
def test_lowers_the_loss_of_a_tiny_lora_model(tiny_model_factory, tiny_tokenizer, name):
    model = tiny_model_factory("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = prepare_model(model, "lora", lora=LoraSettings(), seed=0)
    sentences = ["the movie was great fun", "a terrible boring film", "great acting and a great story", "it was bad"]
    examples = [Example(id=f"t:{i}", fields={"text": s}, label=i % 2) for i, s in enumerate(sentences)]
    encoder = Encoder(tiny_tokenizer, TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"]))
    closure = torch.no_grad()(objectives.objective_fn("loss", model, tiny_tokenizer, encoder, examples, "cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.ndim == 2 for p in trainable)
    cls, kwargs = CLASSES[name]
    opt = cls(trainable, lr=3e-2 if name == "lozo" else 5e-2, eps=1e-2, rank=2, refresh_every=20, seed=0, **kwargs)
    start = float(closure())
    for _ in range(40):
        opt.step(closure)
    assert float(closure()) < start - 0.1


# -- settings and cost --------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,match", [
    (LOZO, {"rank": 0}, "rank >= 1"), (LOZO, {"refresh_every": 0}, "refresh_every >= 1"),
    (LOZOM, {"momentum": 1.0}, r"momentum must be in \[0, 1\)"), (LOZOM, {"momentum": -0.1}, "momentum"),
    (LOZO, {"rank": 1.5}, "rank >= 1")])
def test_bad_settings(cls, kwargs, match):
    with pytest.raises(FtlabError, match=match) as info:
        cls([torch.nn.Parameter(torch.zeros(3, 4))], **kwargs)
    assert "\n" not in str(info.value)


def test_cost_counts_the_factors():
    w, b = torch.nn.Parameter(torch.zeros(30, 20)), torch.nn.Parameter(torch.zeros(20))
    plain = LOZO([w, b], rank=2)
    # V (2 x 20) and U (2 x 30) float32, plus the update's temporaries (3 x 2 x 30)
    assert plain.extra_bytes() == 4 * (2 * 20 + 2 * 30) + 4 * 3 * 2 * 30
    assert plain.extra_bytes_per_entry == pytest.approx(plain.extra_bytes() / 620, abs=1e-4)
    momentum = LOZOM([w, b], rank=2)
    assert momentum.extra_bytes() == plain.extra_bytes() + 4 * 2 * 30 + 4 * 20  # N, the bias's buffer
    assert "LOZOM: 2 forwards a step" in momentum.cost()
    assert LOZO([w], rank=2, n_perturbations=3, one_sided=True).forwards_per_step == 4


def test_bf16_exact_mode_replays_and_keeps_float32_momentum(tiny_model_factory):
    model = tiny_model_factory("llama").to(torch.bfloat16)
    base = copy.deepcopy(model)
    ids = torch.arange(2, 20)[None]
    common = dict(lr=1e-3, eps=1e-2, rank=2, refresh_every=2, momentum=0.9, seed=2)
    opt = LOZOM(model.parameters(), **common)  # bf16: exact mode
    assert opt.exact
    opt.attach(model)
    _run(model, opt, 3, ids)
    assert all(opt.state[p]["momentum"].dtype == torch.float32 for p in model.parameters())
    fresh = LOZOM(base.parameters(), **common)
    fresh.load_state_dict(opt.state_dict())
    _same_state(opt, fresh)
    replayer = LOZOM(base.parameters(), **common)
    for record in opt.history:
        replayer.replay(record)
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)
    _same_state(opt, replayer)
