"""SVAG: Stochastic Variance Amplified Gradient (Li, Malladi, Arora 2021, "On the Validity of
Modeling SGD with Stochastic Differential Equations").

SVAG with parameter ``l >= 1`` simulates SGD's SDE more and more closely as ``l`` grows, at ``l``
times the number of steps. Each step draws two *independent* minibatch gradients ``g1, g2`` and
applies SGD with lr ``lr / l`` to

    g = r1 g1 + r2 g2,   r1 = (1 + sqrt(2l - 1)) / 2,   r2 = (1 - sqrt(2l - 1)) / 2.

Since ``r1 + r2 = 1`` the mean is the full gradient, and since ``r1**2 + r2**2 = l`` the noise
covariance is ``l`` times SGD's; with lr ``lr / l`` the drift per step shrinks ``l``-fold and the
noise per step ``sqrt(l)``-fold, exactly the SDE's scaling of time. Run ``l`` times as many steps to
cover the same SDE time. ``l = 1`` gives ``r1 = 1, r2 = 0``: plain SGD.

If SGD (``l = 1``) and SVAG at ``l = 2, 4, ...`` reach the same metrics after the same SDE time, the
SDE models this SGD run well (Li et al.'s test); a large gap says it does not, and then the linear
scaling rule is not expected to hold either.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ftlab.errors import FtlabError


def svag_coefficients(l: float) -> tuple[float, float]:
    """``(r1, r2)`` of SVAG with parameter ``l`` (``r1 + r2 = 1``, ``r1**2 + r2**2 = l``)."""
    if not l >= 1:
        raise FtlabError(f"SVAG's l must be >= 1 (l = 1 is SGD), got {l!r}")
    root = math.sqrt(2 * l - 1)
    return (1 + root) / 2, (1 - root) / 2


class SVAG(torch.optim.Optimizer):
    """SGD with SVAG's variance amplification (see the module docstring).

    ``step(closure)`` calls ``closure`` twice; each call must compute the loss of a *new,
    independently drawn* minibatch and leave its gradient in ``.grad`` (as a closure that zeroes
    gradients, draws a batch and calls ``backward`` does). ``lr`` is SGD's lr; the step uses
    ``lr / l``. Returns the mean of the two losses.
    """

    def __init__(self, params, lr: float, l: float = 1.0, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise FtlabError(f"SVAG's lr must be positive, got {lr!r}")
        r1, r2 = svag_coefficients(l)
        super().__init__(params, dict(lr=lr, l=l, r1=r1, r2=r2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One SVAG step from two independent minibatch gradients drawn by ``closure``."""
        if closure is None:
            raise FtlabError("SVAG needs a closure that draws a fresh minibatch on each call")
        with torch.enable_grad():
            first = closure()
        saved = [[None if p.grad is None else p.grad.clone() for p in g["params"]] for g in self.param_groups]
        with torch.enable_grad():
            second = closure()
        for group, grads1 in zip(self.param_groups, saved):
            lr = group["lr"] / group["l"]
            for p, g1 in zip(group["params"], grads1):
                if g1 is None or p.grad is None:
                    continue
                g = g1.mul(group["r1"]).add_(p.grad, alpha=group["r2"])
                if group["weight_decay"]:
                    g.add_(p, alpha=group["weight_decay"])
                p.add_(g, alpha=-lr)
        return (first.detach() + second.detach()) / 2
