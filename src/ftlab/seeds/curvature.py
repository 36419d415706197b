"""How sharp a run's minimum is, from its loss on a fixed example set, over its trainable tensors.

- :func:`epsilon_sharpness` (Keskar et al., 2017; the measure Juneja et al. 2023 compare basins
  with): ``100 (max_{delta in C} L(theta + delta) - L(theta)) / (1 + L(theta))`` over the box
  ``C = {|delta_i| <= eps (|theta_i| + 1)}``. The maximum is approached by ``steps`` of projected
  sign-gradient ascent from ``delta = 0`` (Keskar et al. use L-BFGS-B); the best loss seen is kept,
  so the result is a lower bound of the true maximum, exact when the loss is monotone in each
  coordinate over the box.
- :func:`hutchinson_trace`: ``tr(H) ~ mean_s v_s^T H v_s`` with Rademacher ``v_s`` drawn from a
  seeded generator (``E[v v^T] = I``, so each term is unbiased), ``H v`` by double backward; with
  its standard error over the samples.

Both take ``loss_fn()``: the mean loss over the set as a differentiable scalar of ``params``
(see :func:`set_loss`), so they work on any module.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ftlab import objectives
from ftlab.errors import FtlabError
from ftlab.objectives import ModelBatch

LossFn = Callable[[], torch.Tensor]


def set_loss(module: nn.Module, batches: Sequence[ModelBatch], option_ids: list[list[int]]) -> LossFn:
    """The mean cross-entropy over every example of ``batches`` (weighted by batch size), as a
    function of ``module``'s current weights."""
    total = sum(int(b.gold.shape[0]) for b in batches)

    def loss_fn() -> torch.Tensor:
        return sum(objectives.loss(module, b, option_ids) * (b.gold.shape[0] / total) for b in batches)
    return loss_fn


def hessian_vector_product(loss_fn: LossFn, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """``H v`` of ``loss_fn`` at the current ``params`` (double backward). Attention runs on
    PyTorch's math SDPA kernel here: the fused kernels have no second derivative."""
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors))
        return list(torch.autograd.grad(dot, params))


def hutchinson_trace(loss_fn: LossFn, params: Sequence[torch.Tensor], n_samples: int = 8, seed: int = 0
                     ) -> dict[str, float]:
    """Hutchinson's estimate of the trace of the Hessian of ``loss_fn`` w.r.t. ``params``:
    ``{"trace", "stderr", "n_samples"}``. The Rademacher vectors come from a CPU generator seeded
    with ``seed`` (the same vectors on any device)."""
    if n_samples < 1:
        raise FtlabError(f"hutchinson_trace: n_samples must be >= 1, got {n_samples}")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_samples):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]
        hv = hessian_vector_product(loss_fn, params, vs)
        values.append(float(sum((v * h).sum() for v, h in zip(vs, hv))))
    mean = sum(values) / n_samples
    var = sum((x - mean) ** 2 for x in values) / (n_samples - 1) if n_samples > 1 else float("nan")
    return {"trace": mean, "stderr": math.sqrt(var / n_samples) if n_samples > 1 else float("nan"),
            "n_samples": n_samples}


def epsilon_sharpness(loss_fn: LossFn, params: Sequence[torch.Tensor], eps: float = 1e-3, steps: int = 5
                      ) -> dict[str, float]:
    """Keskar et al.'s epsilon-sharpness of ``loss_fn`` at the current ``params`` (restored on
    return): ``{"sharpness", "loss", "max_loss", "eps", "steps"}``."""
    if eps < 0 or steps < 1:
        raise FtlabError(f"epsilon_sharpness: need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
    theta = [p.detach().clone() for p in params]
    radius = [eps * (t.abs() + 1) for t in theta]
    with torch.no_grad():
        base = float(loss_fn())
    best = base
    delta = [torch.zeros_like(t) for t in theta]
    try:
        for _ in range(steps):
            grads = torch.autograd.grad(loss_fn(), params)
            with torch.no_grad():
                for p, t, d, g, r in zip(params, theta, delta, grads, radius):
                    # A step of 2 r / steps along sign(g), projected back into the box.
                    d.add_(torch.sign(g) * r * (2.0 / steps)).clamp_(min=-r, max=r)
                    p.copy_(t + d)
                best = max(best, float(loss_fn()))
    finally:
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
    return {"sharpness": 100.0 * (best - base) / (1.0 + base), "loss": base, "max_loss": best, "eps": eps,
            "steps": steps}
