"""Hutchinson's trace against the exact Hessian, epsilon-sharpness against a closed form."""

import pytest
import torch
from test_paths import SPEC, cue_examples
from torch import nn

from ftlab import objectives
from ftlab.models import LoraSettings, prepare_model, trainable_parameters
from ftlab.objectives import Encoder
from ftlab.seeds.curvature import epsilon_sharpness, hessian_vector_product, hutchinson_trace, set_loss


@pytest.fixture
def tiny_loss(tiny_model_factory, tiny_tokenizer):
    """The mean loss of a float64 tiny Llama with LoRA (r=1 on q) on 6 examples, its LoRA
    tensors (B moved off zero so the Hessian is not trivial), and a flat-vector version."""
    module = prepare_model(tiny_model_factory("llama").double(), "lora",
                           lora=LoraSettings(r=1, target_modules=["q_proj"]))
    params = [p for _, p in trainable_parameters(module)]
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    encoder = Encoder(tiny_tokenizer, SPEC)
    batches = [objectives.training_batch(encoder, cue_examples(6)[s:s + 3]) for s in (0, 3)]
    return set_loss(module, batches, encoder.option_ids), params


@pytest.fixture
def mlp_loss():
    """A tiny float64 MLP (4 -> 5 -> 2, tanh; 37 parameters) with its cross-entropy on 8 points,
    and the exact Hessian of that loss (torch.func.hessian of the flattened parameters)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1] * 4)
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    shapes = [p.shape for p in params]

    def flat_loss(flat):
        parts, s = {}, 0
        for n, shape in zip(names, shapes):
            size = int(torch.tensor(shape).prod())
            parts[n] = flat[s:s + size].view(shape)
            s += size
        return nn.functional.cross_entropy(torch.func.functional_call(net, parts, (x,)), y)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hess = torch.func.hessian(flat_loss)(flat)
    return (lambda: nn.functional.cross_entropy(net(x), y)), params, hess


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_hutchinson_matches_the_exact_trace(mlp_loss):
    loss_fn, params, hess = mlp_loss
    n = hess.shape[0]
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    parts = list(torch.split(v, [p.numel() for p in params]))
    hv = _flat(hessian_vector_product(loss_fn, params, [t.view(p.shape) for t, p in zip(parts, params)]))
    assert torch.allclose(hv, hess @ v, atol=1e-12)
    exact = float(torch.trace(hess))
    # Each Hutchinson term is r^T H r for the seeded Rademacher r: reproduce them from H.
    est = hutchinson_trace(loss_fn, params, n_samples=5, seed=7)
    gen = torch.Generator().manual_seed(7)
    terms = []
    for _ in range(5):
        r = _flat([(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).double() for p in params])
        terms.append(float(r @ hess @ r))
    assert est["trace"] == pytest.approx(sum(terms) / 5, rel=1e-10)
    # Unbiased: many samples land within 4 standard errors of the exact trace, and the
    # standard error shrinks like 1/sqrt(n).
    many = hutchinson_trace(loss_fn, params, n_samples=800, seed=1)
    assert abs(many["trace"] - exact) < 4 * many["stderr"] and many["stderr"] < 0.1 * abs(exact) + 1e-3
    assert hutchinson_trace(loss_fn, params, 4, seed=3) == hutchinson_trace(loss_fn, params, 4, seed=3)


def test_hutchinson_runs_through_a_lora_llama(tiny_loss):
    # Fused attention kernels have no double backward; the estimate must still be finite.
    loss_fn, params = tiny_loss
    out = hutchinson_trace(loss_fn, params, n_samples=2, seed=0)
    assert torch.isfinite(torch.tensor(out["trace"])) and out["n_samples"] == 2


def test_epsilon_sharpness_of_a_quadratic_is_the_closed_form():
    a = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def loss_fn():
        return 0.5 * (a * theta**2).sum() + (b * theta).sum()
    eps = 0.1  # box |delta_i| <= eps (|theta_i| + 1) = 0.1; the maximum sits at delta = eps sign(b)
    out = epsilon_sharpness(loss_fn, [theta], eps=eps, steps=1)
    want = float(0.5 * (a * eps**2).sum() + (b.abs() * eps).sum())
    assert out["max_loss"] == pytest.approx(want) and out["loss"] == 0.0
    assert out["sharpness"] == pytest.approx(100 * want / (1 + 0))
    assert torch.equal(theta.detach(), torch.zeros(3, dtype=torch.float64))  # restored
    assert epsilon_sharpness(loss_fn, [theta], eps=0.0)["sharpness"] == 0.0


def test_sharpness_runs_on_a_model(tiny_loss):
    loss_fn, params = tiny_loss
    before = [p.detach().clone() for p in params]
    out = epsilon_sharpness(loss_fn, params, eps=1e-2, steps=3)
    assert out["sharpness"] > 0 and out["max_loss"] > out["loss"]
    assert all(torch.equal(p, q) for p, q in zip(params, before))
