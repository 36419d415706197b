"""FZOO: fast zeroth-order optimizer (Dang et al., "FZOO: Fast Zeroth-Order Optimizer for
Fine-Tuning LLMs towards Adam-Scale Speed", ICLR 2026).

Per step, N one-sided Rademacher perturbations u_1..u_N (entries +-1) of the same theta:

    L0 = loss(theta),  L_i = loss(theta + eps u_i)
    sigma = std(L_1, ..., L_N)                                 (sample std, N - 1)
    theta <- theta - lr / (N sigma) * sum_i (L_i - L0) u_i

Dividing by sigma, the spread of the perturbed losses, adapts the step size: since
``L_i - L0 ~ eps <grad, u_i>`` and the std of ``<grad, u_i>`` over Rademacher u is ``||grad||``,
``sigma ~ eps ||grad||`` and the update is about ``lr * (1/N) sum_i <grad/||grad||, u_i> u_i``:
normalized SGD on a ZO estimate, with no eps in it (the paper proves this equivalence). Each
entry moves by about ``lr`` times a number of order one, as with Adam, whence the paper's claim:
Adam-scale convergence speed at inference memory (on average +3% accuracy over MeZO with 3x
fewer forward passes across RoBERTa-large, OPT 350M-66B, Phi-2 and Llama3; 18x fewer on
RoBERTa-large, close to Adam). Use an Adam-sized lr, not MeZO's. (Some restatements put
``1/eps`` in the gradient estimate, ``theta -= lr * g / sigma`` with
``g = (1/(eps N)) sum_i (L_i - L0) u_i``: that is this rule with lr divided by eps.)

Cost: **N + 1 forwards a step** (one at theta, one per perturbation), or with ``batched=True``
*one* forward of N + 1 copies of the batch (:mod:`ftlab.zo.batched`: for small trainable tensors,
LoRA or a prefix). **Extra memory: none** (0 bytes per trainable entry; batched: the N + 1
stacked copies of the trainable tensors and N + 1 times the activations, during the step).

In ftlab FZOO is MeZO (:mod:`ftlab.zo.mezo`) with a different scalar per seed: it keeps the
seed trick, the z generators (default ``distribution="rademacher"``), exact mode, data
parallelism and the trajectory log. The normalisation is folded into the logged projected
gradients, ``g_i = f32((L_i - L0) / sigma)``, and the update is MeZO's
``theta -= lr ((1/N) sum_i g_i u_i + wd theta)``, so a replay from ``(seeds, g, lr)`` is
MeZO's replay, bit for bit. sigma is computed from the loss differences, which have the L_i's
spread (a shift by L0 leaves a std alone): under data parallelism the ranks' differences are
averaged in MeZO's one all-reduce and sigma is the std of those averages, i.e. of the mean
losses over ranks. With N = 1 the std is undefined and sigma is ``|L_1 - L0|`` (a sign step).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.zo.directions import local_part
from ftlab.zo.mezo import LossAt, MeZO, Update, ZOStep, f32

# losses(seeds): [L0, L_1, ..., L_N], the loss at theta and at theta + eps u(seed_i)
Losses = Callable[[list[int]], list[float]]


def fzoo(seeds: list[int], losses: Losses, update: Update, *, lr: float,
         mean: Callable[[list[float]], list[float]] = lambda values: values) -> ZOStep:
    """One FZOO step over the N ``seeds``, given the operations on theta: ``losses`` evaluates
    the model at theta and at the N perturbed points, ``update`` moves theta (MeZO's update).

        L0, L_1..L_N = losses(seeds)                     # theta, theta + eps u_i (same theta)
        d_i = L_i - L0
        d, L0 = mean(d, L0)                              # over data-parallel ranks: one all-reduce
        sigma = std(d_1..d_N)                            # = std(L_1..L_N); N = 1: |d_1|
        g_i = float32(d_i / sigma)                       # 0 if sigma = 0 (the L_i all equal)
        if a g_i or L0 is not finite: g, lr, L0 = 0, 0, NaN   # skipped: theta is only restored
        theta <- theta - lr ((1/N) sum_i g_i u_i + wd theta)

    Returns the step's record (seeds, g, lr, L0): what a trajectory log keeps."""
    base, *perturbed = losses(seeds)
    *diffs, base = mean([loss - base for loss in perturbed] + [base])
    sigma = spread(diffs)
    grads = [f32(d / sigma) if sigma > 0 else 0.0 for d in diffs]
    if not all(math.isfinite(x) for x in grads + [base, sigma]):
        grads, lr, base = [0.0] * len(seeds), 0.0, math.nan
    update(seeds, grads, lr)
    return ZOStep(seeds, grads, lr, base)


def spread(values: list[float]) -> float:
    """The sample standard deviation of ``values`` (N - 1); ``|value|`` for a single one."""
    n = len(values)
    if n == 1:
        return abs(values[0])
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))


class FZOO(MeZO):
    """FZOO (see the module docstring): N one-sided Rademacher perturbations a step, the step
    normalised by the std of the perturbed losses. **N + 1 forwards a step** (``batched``: one
    forward of N + 1 copies of the batch); **no extra memory**.

    Args:
        params, lr, eps, weight_decay, generator, seed, chunk_size, exact: as :class:`MeZO`.
            ``lr`` is Adam-sized (each entry moves by about lr a step).
        n_perturbations: N, the perturbations a step (the paper uses 8 or so; N = 1 gives a
            sign step, see the module docstring).
        distribution: ``"rademacher"`` (the paper's) or ``"gaussian"``.
        batched: evaluate the N + 1 points in one vmapped forward; ``step`` then needs a
            closure with a ``losses(stacked)`` method (:class:`ftlab.zo.batched.BatchedObjective`).
            Theta is never moved by a perturbation (as in exact mode), so a replay must use the
            same value; it is part of :meth:`z_spec`.
        one_sided: accepted for a uniform interface and ignored: FZOO is one-sided.
    """

    closure_returns = "the loss (batched: a BatchedObjective)"

    def __init__(self, params: Iterable, n_perturbations: int = 8, distribution: str = "rademacher",
                 batched: bool = False, **kwargs: Any) -> None:
        kwargs.pop("one_sided", None)
        eps = kwargs.get("eps", 1e-3)
        if n_perturbations < 1 or eps <= 0:
            raise FtlabError(f"FZOO needs n_perturbations >= 1 and eps > 0 (got n={n_perturbations}, eps={eps})")
        super().__init__(params, n_perturbations=n_perturbations, one_sided=True, distribution=distribution,
                         **kwargs)
        self.batched = batched

    def cost(self) -> str:
        if not self.batched:
            return super().cost()
        return (f"FZOO: 1 batched forward of {self.n + 1} copies of the batch a step, "
                f"{self.extra_bytes_per_entry} extra bytes per trainable entry")

    def z_spec(self) -> dict:
        return {**super().z_spec(), "batched": self.batched}

    def _algorithm(self, seeds: list[int], closure: Callable[[], Tensor], lr: float) -> ZOStep:
        """One step of :func:`fzoo`; its loss is L0, the loss at theta."""
        if self.batched and not hasattr(closure, "losses"):
            raise FtlabError(f"{type(self).__name__}.step needs a closure returning {self.closure_returns}")
        losses = self._batched_losses(closure) if self.batched else self._sequential_losses(closure)
        return fzoo(seeds, losses, self._update, lr=lr, mean=self._mean)

    def _sequential_losses(self, closure: Callable[[], Tensor]) -> Losses:
        """:func:`fzoo`'s ``losses`` from MeZO's ``loss(seed, c)``: the same calls, in the same
        order, as MeZO's one-sided forwards (so :meth:`MeZO.replay` redoes the same moves)."""
        loss = self._evaluator(closure)
        return lambda seeds: [loss(None, 0.0)] + [loss(seed, self.eps) for seed in seeds]

    def _batched_losses(self, closure: Any) -> Losses:
        """:func:`fzoo`'s ``losses`` in one forward: every trainable tensor stacked as
        ``[theta, theta + eps u_1, ..., theta + eps u_N]`` (theta itself is not moved)."""
        def losses(seeds: list[int]) -> list[float]:
            stacked = {}
            for index, p, _ in self._params():
                if local_part(p)[0].numel() != p.numel():
                    raise FtlabError("FZOO batched=true needs unsharded trainable parameters")
                copies = [p.detach()] + [self.perturbed(seed, index, p, self.eps).view_as(p) for seed in seeds]
                stacked[closure.name_of(p)] = torch.stack(copies)
            return closure.losses(stacked).tolist()
        return losses

    def _evaluator(self, closure: Callable[[], Tensor] | None) -> LossAt:
        if self.batched:  # theta never moves: a replay makes no perturbation moves
            return lambda seed, coef: 0.0
        return super()._evaluator(closure)

    @property
    def _restore(self) -> float:
        return 0.0 if self.batched else super()._restore
