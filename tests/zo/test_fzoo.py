"""FZOO against a naive float64 reference (z materialised, points evaluated out of place), on a
quadratic with a known gradient: direction, variance against N, learning, bitwise replay, the
data-parallel normalisation, and bad settings."""

import math
import statistics

import pytest
import torch
from reference import f32, z_of
from torch import nn

from ftlab.errors import FtlabError
from ftlab.zo.fzoo import FZOO, fzoo, spread

EPS = 1e-4


class Quadratic(nn.Module):
    """f(v) = 1/2 (v - a)^T H (v - a), v the concatenation of two parameters (float64)."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.x = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        m = torch.randn(17, 17, generator=gen, dtype=torch.float64)
        self.register_buffer("h", m @ m.T / 17 + torch.eye(17, dtype=torch.float64))
        self.register_buffer("a", torch.randn(17, generator=gen, dtype=torch.float64))

    def vector(self):
        return torch.cat([self.x.reshape(-1), self.w.reshape(-1)])

    def forward(self):
        r = self.vector() - self.a
        return 0.5 * r @ self.h @ r

    def gradient(self):
        return self.h @ (self.vector().detach() - self.a)


def _groups(model, wd):
    return [{"params": [model.x], "weight_decay": 0.0}, {"params": [model.w], "weight_decay": wd}]


@torch.no_grad()
def reference_step(params, loss_fn, seeds, lr, eps, wds, chunk, generator):
    """The paper's rule, written out: L0, L_i = f(theta + eps u_i) out of place, sigma the
    sample std of the L_i, theta -= lr/(N sigma) sum_i (L_i - L0) u_i (and lr wd theta).
    Returns the normalised scalars (L_i - L0) / sigma."""
    lr = f32(lr)
    us = [[z_of(p, s, i, chunk, "rademacher", generator) for i, p in enumerate(params)] for s in seeds]
    theta = [p.detach().clone() for p in params]
    base = loss_fn()
    losses = []
    for u in us:
        for p, t, ui in zip(params, theta, u):
            p.copy_(t + eps * ui)
        losses.append(loss_fn())
    sigma = statistics.stdev(losses) if len(seeds) > 1 else abs(losses[0] - base)
    scale = [(loss - base) / sigma for loss in losses]
    for p, t, u_i, wd in zip(params, theta, zip(*us), wds):
        p.copy_(t - lr * wd * t - lr / len(seeds) * sum(c * ui for c, ui in zip(scale, u_i)))
    return scale


@pytest.mark.parametrize("n,generator,exact", [(1, "strided", False), (3, "torch", False), (8, "strided", False),
                                               (4, "strided", True), (5, "table", True)])
def test_one_step_matches_a_naive_reference(n, generator, exact):
    model, ref = Quadratic(), Quadratic()
    chunk, wd, lr = 4, 0.1, 0.05  # several chunks (rows) per parameter
    opt = FZOO(_groups(model, wd), lr=lr, eps=1e-3, n_perturbations=n, generator=generator, seed=3,
               chunk_size=chunk, exact=exact)
    opt.attach(model)
    for _ in range(3):
        before = float(ref().detach())
        loss = opt.step(model)
        record = opt.history[-1]
        want = reference_step([ref.x, ref.w], lambda: float(ref()), record.seeds, lr, 1e-3, [0.0, wd], chunk,
                              generator)
        assert record.grads == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert record.loss == pytest.approx(before, rel=1e-7)  # L0, the loss at theta (g rounds to f32)
        assert float(loss) == pytest.approx(before, rel=1e-7)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6 * lr)


def test_the_step_returns_the_loss_at_theta():
    model = Quadratic()
    before = float(model().detach())
    opt = FZOO(model.parameters(), lr=0.01, eps=EPS, n_perturbations=4, seed=0)
    assert float(opt.step(model)) == pytest.approx(before, rel=1e-7)
    assert opt.forwards_per_step == 5 and opt.extra_bytes_per_entry == 0
    assert opt.cost() == "FZOO: 5 forwards a step, 0 extra bytes per trainable entry"


def _estimates(n, samples, seed=0):
    """The step direction ``(theta_before - theta_after) / lr`` of ``samples`` independent FZOO
    steps from the same theta, and the true gradient there."""
    model = Quadratic()
    start = [p.detach().clone() for p in model.parameters()]
    opt = FZOO(model.parameters(), lr=1.0, eps=EPS, n_perturbations=n, seed=seed)
    out = []
    for _ in range(samples):
        opt.step(model)
        out.append(torch.cat([(s - p.detach()).reshape(-1) for s, p in zip(start, model.parameters())]))
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
    return torch.stack(out), model.gradient()


def test_the_expected_direction_is_the_normalised_gradient():
    est, grad = _estimates(8, 1500)
    mean = est.mean(0)
    cosine = float(mean @ grad / (mean.norm() * grad.norm()))
    assert cosine > 0.97  # sampling noise: ~1 - d / (2 samples N) with d = 17
    # sigma ~ eps ||grad||: the expected step is about grad / ||grad|| (normalised SGD), eps-free
    assert float(mean.norm()) == pytest.approx(1.0, rel=0.2)


def test_the_variance_falls_like_one_over_n():
    """With sigma ~ eps ||grad|| each term (L_i - L0)/sigma u_i is ~ <grad/||grad||, u> u, whose
    variance is d - 1 for Rademacher u (||u||^2 = d): the estimate's is ~ (d - 1)/N (the sample
    std, itself noisy, adds a little at small N)."""
    variance = {}
    for n in (8, 32):
        est, _ = _estimates(n, 800, seed=n)
        variance[n] = float(((est - est.mean(0)) ** 2).sum(1).mean())
        assert n * variance[n] == pytest.approx(17 - 1, rel=0.25)
    assert 3.2 < variance[8] / variance[32] < 5.0


def test_fzoo_learns_the_quadratic():
    model = Quadratic()
    start = float(model().detach())
    opt = FZOO(model.parameters(), lr=0.05, eps=EPS, n_perturbations=8, seed=1)
    for _ in range(300):
        opt.step(model)
    assert float(model().detach()) < start / 20


@pytest.mark.parametrize("exact", [False, True])
def test_replay_is_bitwise(tiny_model_factory, exact):
    model = tiny_model_factory("llama")  # float32: in-place moves round, a replay must round alike
    base = tiny_model_factory("llama")
    ids = torch.arange(2, 30)[None]
    kwargs = dict(lr=1e-3, eps=1e-3, n_perturbations=3, weight_decay=0.01, exact=exact)
    opt = FZOO(model.parameters(), seed=3, **kwargs)
    opt.attach(model)
    for _ in range(4):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert any(p.ne(q).any() for p, q in zip(model.parameters(), base.parameters()))
    replayer = FZOO(base.parameters(), seed=999, **kwargs)
    for record in opt.history:
        replayer.replay(record)
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)


def test_the_normalisation_follows_the_data_parallel_mean():
    """sigma is the std of the rank-averaged differences (= of the mean losses over ranks), taken
    after MeZO's one all-reduce; the recorded g are those differences over it."""
    ranks = [[1.0, 1.3, 0.9, 1.1], [2.0, 2.1, 2.5, 1.7]]  # [L0, L_1, L_2, L_3] on two ranks
    moved = []

    def mean(values):  # what all_reduce_mean does across the two ranks, from rank 0's values
        other = [loss - ranks[1][0] for loss in ranks[1][1:]] + [ranks[1][0]]
        return [(a + b) / 2 for a, b in zip(values, other)]

    record = fzoo([1, 2, 3], lambda seeds: ranks[0], lambda s, g, lr: moved.append((s, g, lr)), lr=0.5, mean=mean)
    mean_losses = [(a + b) / 2 for a, b in zip(*ranks)]
    sigma = statistics.stdev(mean_losses[1:])
    assert record.grads == [f32((x - mean_losses[0]) / sigma) for x in mean_losses[1:]]
    assert record.loss == pytest.approx(mean_losses[0]) and moved == [([1, 2, 3], record.grads, 0.5)]


def test_flat_and_non_finite_losses():
    moved = []
    flat = fzoo([1, 2], lambda seeds: [1.0, 1.5, 1.5], lambda s, g, lr: moved.append((g, lr)), lr=0.1)
    assert flat.grads == [0.0, 0.0] and flat.lr == 0.1  # sigma = 0: no direction, only the decay
    bad = fzoo([1, 2], lambda seeds: [1.0, math.nan, 1.5], lambda s, g, lr: moved.append((g, lr)), lr=0.1)
    assert bad.grads == [0.0, 0.0] and bad.lr == 0.0 and math.isnan(bad.loss)
    assert spread([-0.25]) == 0.25 and spread([1.0, 3.0]) == pytest.approx(math.sqrt(2))


def test_a_skipped_step_leaves_theta_alone():
    model = Quadratic()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FZOO(model.parameters(), lr=0.1, eps=EPS, n_perturbations=3, seed=0)
    assert math.isnan(float(opt.step(lambda: torch.tensor(math.nan))))
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kwargs", [{"n_perturbations": 0}, {"n_perturbations": -2}, {"eps": 0.0}, {"eps": -1e-3}])
def test_bad_settings_are_one_line_errors(kwargs):
    with pytest.raises(FtlabError, match=r"^FZOO needs n_perturbations >= 1 and eps > 0 \(got [^\n]*\)$"):
        FZOO(Quadratic().parameters(), **kwargs)


def test_batched_needs_a_batched_closure():
    model = Quadratic()
    opt = FZOO(model.parameters(), lr=0.1, batched=True)
    with pytest.raises(FtlabError, match="^FZOO.step needs a closure returning the loss"):
        opt.step(model)
    assert opt.z_spec()["batched"] is True and opt.z_spec()["distribution"] == "rademacher"
