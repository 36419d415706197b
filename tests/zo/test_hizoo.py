"""HiZOO on quadratics ``f(x) = 1/2 (x-a)^T H (x-a)`` with a diagonal, ill-conditioned H (where
the central differences are exact and the gradient is known): what S converges to, what the step
is an unbiased estimate of, HiZOO against MeZO at equal forwards; a naive float64 reference of a
step; bad settings, replay refused, state_dict round trip, skipped steps, exact mode."""

import copy
import math

import pytest
import torch
from reference import directions, f32
from torch import nn

from ftlab.checkpoint import load_checkpoint, save_checkpoint
from ftlab.errors import FtlabError
from ftlab.zo.hizoo import HiZOO
from ftlab.zo.mezo import MeZO


class Quadratic(nn.Module):
    """f(x) = 1/2 sum_i h_i (x_i - a_i)^2, x a Parameter (the closure is the module itself)."""

    def __init__(self, h, a, x0=None, dtype=torch.float64):
        super().__init__()
        self.h, self.a = h, a  # float64; the loss too, whatever the dtype of x
        self.x = nn.Parameter((torch.zeros_like(a) if x0 is None else x0).to(dtype).clone())

    def forward(self):
        return 0.5 * (self.h * (self.x.double() - self.a) ** 2).sum()

    def grad(self):
        return self.h * (self.x.detach().double() - self.a)


def ill_conditioned(d=16, condition=1e3):
    return torch.logspace(0, math.log10(condition), d, dtype=torch.float64), torch.linspace(-1, 1, d,
                                                                                           dtype=torch.float64)


def test_hessian_estimate_learns_the_diagonal_hessian_up_to_one_plus_d_over_2():
    # At a fixed theta (lr 0) the moving average of c S z^2 has its fixed point at
    # S = (1 + d/2) diag(H) (module docstring): S learns diag(H)'s shape, 100x across entries.
    # The average is multiplicative (S <- S (1 - alpha + alpha c z^2)) and heavy-tailed (z^4):
    # compare the time average of log S.
    d = 8
    h, a = ill_conditioned(d, 1e2)
    model = Quadratic(h, a)
    opt = HiZOO(model.parameters(), lr=0.0, eps=1e-3, hessian_smoothing=1e-2, seed=0, generator="torch")
    logs = []
    for t in range(3000):
        opt.step(model)
        if t >= 1000:
            logs.append(opt.state[model.x]["hessian"].log())
    log_sigma = torch.stack(logs).mean(0)
    ratio = (log_sigma - h.log()).exp() / (1 + d / 2)
    assert torch.corrcoef(torch.stack([log_sigma, h.log()]))[0, 1] > 0.99
    assert torch.all((ratio > 1 / 1.6) & (ratio < 1.6)), ratio
    assert abs(float(ratio.median()) - 1) < 0.2, ratio
    assert torch.equal(model.x.detach(), torch.zeros(d, dtype=torch.float64))  # lr 0: theta never moved


def test_the_step_is_an_unbiased_estimate_of_the_preconditioned_gradient():
    # For a quadratic g = grad^T S^{-1/2} z exactly, so E[g S^{-1/2} z] = S^{-1} grad at a fixed S.
    # One step of n seeds averages n such estimates; with alpha tiny the new S is the old one.
    d, n = 16, 10000
    h, a = ill_conditioned(d)
    model = Quadratic(h, a, x0=a + 1 / h.sqrt())  # S^{-1/2} grad balanced across entries
    opt = HiZOO(model.parameters(), lr=1.0, eps=1e-3, hessian_smoothing=1e-12, n_perturbations=n, seed=1,
                generator="torch")
    sigma = 5 * h * torch.linspace(0.5, 2, d, dtype=torch.float64)  # some S, not a multiple of diag(H)
    opt.hessian(model.x).copy_(sigma)
    x0, grad = model.x.detach().clone(), model.grad()
    opt.step(model)
    step = x0 - model.x.detach()
    want = grad / sigma  # S^{-1} grad
    assert torch.linalg.vector_norm(step - want) / torch.linalg.vector_norm(want) < 0.1
    assert torch.nn.functional.cosine_similarity(step, want, dim=0) > 0.995
    assert torch.nn.functional.cosine_similarity(step, grad, dim=0) < 0.9  # not the raw gradient's direction
    torch.testing.assert_close(opt.state[model.x]["hessian"], sigma, rtol=1e-8, atol=0)


def _final_loss(cls, lr, forwards, **kwargs):
    # Curvatures 1e-4..1e-1 (condition 1000): below S's start (ones) everywhere, so HiZOO's
    # first steps, made before S has learned H, are small rather than unstable.
    h, a = torch.logspace(-4, -1, 16, dtype=torch.float64), torch.linspace(-1, 1, 16, dtype=torch.float64)
    model = Quadratic(h, a)
    opt = cls(model.parameters(), lr=lr, eps=1e-3, seed=0, generator="torch", **kwargs)
    for _ in range(forwards // opt.forwards_per_step):
        opt.step(model)
    loss = float(model().detach())
    return loss if math.isfinite(loss) else math.inf


def test_hizoo_beats_mezo_at_equal_forwards_on_an_ill_conditioned_quadratic():
    forwards = 3000  # MeZO: 1500 steps; HiZOO: 1000
    start = _final_loss(MeZO, 0.0, 2)
    mezo = min(_final_loss(MeZO, lr, forwards) for lr in (0.1, 0.3, 1.0, 3.0))  # its best lr (10: diverges)
    hizoo = _final_loss(HiZOO, 0.1, forwards, hessian_smoothing=0.1)
    assert mezo > start * 1e-3  # MeZO's flat directions barely moved
    assert hizoo < start * 1e-4
    assert hizoo < mezo / 20, (hizoo, mezo)


# -- a naive float64 reference: z materialised, S a dict of whole tensors ------------------------
class TwoParams(nn.Module):
    """A quadratic in x plus a non-quadratic term coupling x and a matrix W (several chunks of z)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.x = nn.Parameter(torch.randn(16, generator=gen, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(6, 50, generator=gen, dtype=torch.float64) * 0.1)
        self.h = torch.logspace(0, 2, 16, dtype=torch.float64)

    def forward(self):
        return 0.5 * (self.h * (self.x - 1) ** 2).sum() + (self.w ** 2).sum() + torch.cos(self.w.sum() * self.x[0])


def reference_step(params, loss_fn, sigma, seeds, lr, eps, alpha, wd_of, chunk, generator):
    """The module docstring's pseudocode, straightforwardly (in float64)."""
    lr, n = f32(lr), len(seeds)
    zs = directions(params, seeds, chunk, generator=generator)
    with torch.no_grad():
        base = float(loss_fn())
        grads, curvatures = [], []
        for z in zs:
            moves = [eps * zi / sigma[i].sqrt() for i, zi in enumerate(z)]
            for p, m in zip(params, moves):
                p.add_(m)
            plus = float(loss_fn())
            for p, m in zip(params, moves):
                p.sub_(2 * m)
            minus = float(loss_fn())
            for p, m in zip(params, moves):
                p.add_(m)
            grads.append(f32((plus - minus) / (2 * eps)))
            curvatures.append(f32(abs(plus + minus - 2 * base) / (2 * eps ** 2)))
        for i, p in enumerate(params):
            sigma[i] = sigma[i] * (1 - alpha + alpha / n * sum(c * z[i] ** 2 for c, z in zip(curvatures, zs)))
            d = sum(g * z[i] for g, z in zip(grads, zs)) / n
            p.mul_(1 - lr * wd_of(i))
            p.sub_(lr * d / sigma[i].sqrt())
    return grads


@pytest.mark.parametrize("n,exact,generator", [(1, False, "torch"), (2, False, "table"), (3, False, "strided"),
                                               (2, True, "strided"), (1, True, "torch")])
def test_matches_a_naive_reference(n, exact, generator):
    model = TwoParams()
    ref_model = copy.deepcopy(model)
    chunk, lr, eps, alpha, wd = 40, 1e-3, 1e-3, 0.05, 0.1
    opt = HiZOO([{"params": [model.x], "weight_decay": 0.0}, {"params": [model.w], "weight_decay": wd}], lr=lr,
                eps=eps, hessian_smoothing=alpha, n_perturbations=n, generator=generator, seed=7, chunk_size=chunk,
                exact=exact)
    opt.attach(model)
    params = [ref_model.x, ref_model.w]
    sigma = [torch.ones_like(p) for p in params]
    for _ in range(3):
        opt.step(model)
        record = opt.history[-1]
        want = reference_step(params, ref_model, sigma, record.seeds, lr, eps, alpha,
                              lambda i: wd if i == 1 else 0.0, chunk, generator)
        assert record.grads == pytest.approx(want, rel=1e-6, abs=1e-9)
    for p, q, s in zip([model.x, model.w], params, sigma):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["hessian"], s, rtol=1e-9, atol=0)
    assert all(p.grad is None for p in model.parameters())


# -- settings, replay, checkpoints, skipped steps, forwards, data parallel ----------------------------------
def test_bad_settings_are_refused_in_one_line():
    p = nn.Parameter(torch.zeros(4))
    for kwargs, match in [({"eps": 0.0}, "eps > 0"), ({"eps": -1e-3}, "eps > 0"),
                          ({"hessian_smoothing": 0.0}, r"hessian_smoothing in \(0, 1\)"),
                          ({"hessian_smoothing": 1.0}, r"hessian_smoothing in \(0, 1\)"),
                          ({"hessian_smoothing": -0.5}, r"hessian_smoothing in \(0, 1\)"),
                          ({"one_sided": True}, "one_sided is not supported"),
                          ({"distribution": "rademacher"}, "needs gaussian z")]:
        with pytest.raises(FtlabError, match=match) as info:
            HiZOO([p], **kwargs)
        assert "\n" not in str(info.value)


def test_replay_is_refused_in_one_line_and_the_run_is_checkpointed_as_tensors():
    model = Quadratic(*ill_conditioned())
    opt = HiZOO(model.parameters(), lr=1e-2, hessian_smoothing=0.1)
    opt.step(model)
    assert opt.replayable is False and opt.extra_bytes_per_entry == 4
    with pytest.raises(FtlabError, match="^HiZOO steps cannot be replayed") as info:
        HiZOO(Quadratic(*ill_conditioned()).parameters()).replay(opt.history[-1])
    assert "\n" not in str(info.value)
    assert opt.cost() == "HiZOO: 3 forwards a step, 4 extra bytes per trainable entry"


@pytest.mark.parametrize("exact", [False, True])
def test_state_dict_round_trip_continues_identically(exact):
    model = Quadratic(*ill_conditioned(), dtype=torch.float32)
    kwargs = dict(lr=0.1, eps=1e-2, hessian_smoothing=0.1, n_perturbations=2, exact=exact)
    opt = HiZOO(model.parameters(), seed=3, **kwargs)
    opt.attach(model)
    for _ in range(3):
        opt.step(model)
    saved_model = Quadratic(model.h, model.a, x0=model.x.detach(), dtype=torch.float32)  # no hooks copied
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(model)
    fresh = HiZOO(saved_model.parameters(), seed=999, **kwargs)  # the seed generator comes from the state
    fresh.attach(saved_model)
    fresh.load_state_dict(saved)
    for _ in range(3):
        fresh.step(saved_model)
    assert torch.equal(saved_model.x, model.x)
    assert torch.equal(fresh.state[saved_model.x]["hessian"], opt.state[model.x]["hessian"])
    assert [r.seeds for r in fresh.history] == [r.seeds for r in opt.history[3:]]


def test_hessian_stays_float32_for_bf16_parameters_exact_mode_and_through_state_dict():
    h, a = torch.logspace(-2, 0, 16, dtype=torch.float64), torch.linspace(-1, 1, 16, dtype=torch.float64)
    model = Quadratic(h, a, dtype=torch.bfloat16)
    kwargs = dict(lr=0.1, eps=5e-2, hessian_smoothing=0.1)  # eps S^{-1/2} z above bf16's resolution
    opt = HiZOO(model.parameters(), seed=2, **kwargs)
    assert opt.exact  # bf16: exact mode, theta never perturbed in place
    opt.attach(model)
    start = float(model().detach())
    for _ in range(300):
        opt.step(model)
    assert float(model().detach()) < start / 10
    assert opt.state[model.x]["hessian"].dtype == torch.float32
    fresh = HiZOO(model.parameters(), seed=5, **kwargs)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[model.x]["hessian"].dtype == torch.float32
    assert torch.equal(fresh.state[model.x]["hessian"], opt.state[model.x]["hessian"])


@pytest.mark.parametrize("exact", [False, True])
def test_a_skipped_step_leaves_weights_and_hessian_alone(exact):
    model = Quadratic(*ill_conditioned(), dtype=torch.float32)
    opt = HiZOO(model.parameters(), lr=0.1, eps=1e-2, hessian_smoothing=0.1, seed=0, exact=exact)
    opt.attach(model)
    opt.step(model)
    x, sigma = model.x.detach().clone(), opt.state[model.x]["hessian"].clone()
    calls = iter([1.0, float("nan"), 2.0])  # L0, L+ (not finite), L-
    assert math.isnan(float(opt.step(lambda: torch.tensor(next(calls)))))
    torch.testing.assert_close(model.x.detach(), x, rtol=0, atol=0 if exact else 1e-6)  # in place: +eps -2eps +eps
    assert torch.equal(opt.state[model.x]["hessian"], sigma)
    assert opt.history[-1].lr == 0.0 and opt.history[-1].grads == [0.0]


@pytest.mark.parametrize("n", [1, 3])
def test_forwards_per_step_and_one_all_reduce_of_all_losses(n):
    model = Quadratic(*ill_conditioned())
    opt = HiZOO(model.parameters(), lr=1e-2, hessian_smoothing=0.1, n_perturbations=n)
    means, forwards = [], []
    opt._mean = lambda values: means.append(list(values)) or values  # the data-parallel average
    opt.step(lambda: forwards.append(1) or model())
    assert len(forwards) == opt.forwards_per_step == 2 * n + 1
    assert len(means) == 1 and len(means[0]) == 2 * n + 1  # L0, the L+ and the L-: one all-reduce
    record = opt.history[-1]
    assert record.loss == means[0][1]  # the first L+
    assert record.grads[0] == f32((means[0][1] - means[0][1 + n]) / (2 * opt.eps))


def test_a_tensor_checkpoint_resumes_identically(tmp_path):
    # What the training loop does for a non-replayable optimizer: save weights, optimizer and
    # scheduler state (S included) with save_checkpoint, load them (weights_only) and go on.
    def build(seed):
        model = Quadratic(*ill_conditioned(), dtype=torch.float32)
        opt = HiZOO(model.parameters(), lr=0.1, eps=1e-2, hessian_smoothing=0.1, seed=seed)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))

    model, opt, scheduler = build(0)
    for _ in range(3):
        opt.step(model)
        scheduler.step()
    save_checkpoint(tmp_path / "checkpoint", model, opt, scheduler, {"step": 3})
    for _ in range(3):
        opt.step(model)
        scheduler.step()
    resumed, fresh, fresh_scheduler = build(1)
    assert load_checkpoint(tmp_path / "checkpoint", resumed, fresh, fresh_scheduler) == {"step": 3}
    for _ in range(3):
        fresh.step(resumed)
        fresh_scheduler.step()
    assert torch.equal(resumed.x, model.x)
    assert torch.equal(fresh.state[resumed.x]["hessian"], opt.state[model.x]["hessian"])
