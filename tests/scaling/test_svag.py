"""SVAG: its coefficients, l = 1 is SGD, and its gradient has SGD's mean and l times its noise."""

import copy
import math

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.scaling import SVAG, svag_coefficients


@pytest.mark.parametrize("l", [1, 1.5, 2, 4, 16])
def test_coefficients_keep_the_mean_and_multiply_the_variance(l):
    r1, r2 = svag_coefficients(l)
    assert r1 + r2 == pytest.approx(1.0)
    assert r1**2 + r2**2 == pytest.approx(l)


def _batches(n_steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=gen, dtype=torch.float64),
             torch.randn(6, generator=gen, dtype=torch.float64)) for _ in range(2 * n_steps)]


def _train(model, opt, batches, calls_per_step):
    it = iter(batches)

    def closure():
        x, y = next(it)
        opt.zero_grad()
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(len(batches) // calls_per_step):
        opt.step(closure)


def test_l_equal_1_is_sgd_bitwise():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    b = copy.deepcopy(a)
    batches = _batches(5, seed=1)
    # SVAG (l = 1) takes batches (1, 2), (3, 4), ...; with r2 = 0 the second is ignored, so SGD
    # on batches 1, 3, 5, ... must give the same weights.
    _train(a, SVAG(a.parameters(), lr=0.1, l=1), batches, calls_per_step=2)
    _train(b, torch.optim.SGD(b.parameters(), lr=0.1), batches[0::2], calls_per_step=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_step_is_the_combined_gradient_at_lr_over_l():
    l, lr = 4.0, 0.3
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    g1, g2 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)
    grads = iter([g1, g2])
    opt = SVAG([w], lr=lr, l=l)

    def closure():
        g = next(grads)
        w.grad = g.clone()
        return torch.tensor(0.0)

    opt.step(closure)
    r1, r2 = (1 + math.sqrt(7)) / 2, (1 - math.sqrt(7)) / 2
    want = -lr / l * (r1 * g1 + r2 * g2)
    assert torch.allclose(w.detach(), want, rtol=1e-14, atol=0)


def test_bad_input():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(FtlabError, match="l must be >= 1"):
        SVAG([w], lr=0.1, l=0.5)
    with pytest.raises(FtlabError, match="closure"):
        SVAG([w], lr=0.1).step()
