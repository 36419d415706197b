"""HiZOO: MeZO with a diagonal Hessian estimate as preconditioner (Zhao et al., "Second-Order
Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order Optimizer", ICLR 2025).

Heterogeneous curvature across parameters slows MeZO: one lr must suit the sharpest direction.
HiZOO keeps a diagonal estimate ``S`` of the Hessian (one float32 per trainable entry, the
paper's ``Sigma^{-1}``), perturbs along ``S^{-1/2} z`` (smaller steps where the loss is sharp),
estimates the curvature along that direction from one more forward (the unperturbed loss) and
updates ``S`` by an exponential moving average. One step (n seeds, smoothing alpha; all products
entrywise)::

    L0 = loss(theta)
    for s in seeds:                                     # every estimate at the same theta and S
        L+_s = loss(theta + eps S^{-1/2} z(s))
        L-_s = loss(theta - eps S^{-1/2} z(s))
    L0, L+, L- = mean(L0, L+, L-)                       # over data-parallel ranks: one all-reduce
    g_s = (L+_s - L-_s) / (2 eps)                       # projected gradient along S^{-1/2} z(s)
    c_s = |L+_s + L-_s - 2 L0| / (2 eps^2)              # curvature along S^{-1/2} z(s)
    if any is not finite: restore theta, skip           # S and theta unchanged, lr logged 0
    S <- (1 - alpha) S + alpha (1/n) sum_s c_s S z(s)^2 # diag(S^{1/2} z z^T S^{1/2}) = S z^2
    theta <- theta - lr ((1/n) sum_s g_s S^{-1/2} z(s) + wd theta)   # with the new S

This is Algorithm 1 of the paper written with ``S = Sigma^{-1}`` (the paper keeps Sigma, an
inverse-Hessian estimate, and updates ``Sigma^{-1}`` as above; ``Sigma_0 = I``, so ``S`` starts
at ones) and its update uses ``Sigma_{t+1}``, the new S. (The authors' released code applies
the moving average to the buffer it perturbs with, Sigma rather than Sigma^{-1}; this follows
the paper's equations.) With n > 1 seeds the curvature estimates are averaged and L0 is shared:
2n + 1 forwards a step (3 for the paper's n = 1).

**What the estimates are.** For a quadratic ``f = 1/2 (x-a)^T H (x-a)`` the central
differences are exact: ``g = grad^T S^{-1/2} z``, so ``E[g S^{-1/2} z] = S^{-1} grad`` -- at a
fixed S the step is an unbiased estimate of the diagonally preconditioned (Newton-like, when
``S ~ diag(H)``) gradient; the update with the new S, which depends on z, deviates from it by
O(alpha). The curvature term is ``c = 1/2 z^T A z`` with ``A = S^{-1/2} H S^{-1/2}``, and for a
diagonal H and Gaussian z, ``E[c S z^2] = diag(H) + tr(A)/2 S``: not diag(H) itself. Its fixed
point is ``S = (1 + d/2) diag(H)`` (d trainable entries): S learns the *shape* of the diagonal
Hessian, scaled by ``1 + d/2``, a constant the lr absorbs (the step is ``S^{-1} grad``, so HiZOO's
lr is on the scale of ``(1 + d/2)`` times MeZO's for the same move). The squares ``z^2`` carry the
per-entry information, so z must be Gaussian: with Rademacher z (``z^2 = 1``) S cannot tell
entries apart, and ``distribution="rademacher"`` is refused. (With the strided generator rows of
a tensor of more than 2^20 entries can reuse table entries; their squares then coincide, a bias
of the curvature estimate of the order of the overlap over d.)

**Cost.** 2n + 1 forwards a step. Memory: S, 4 bytes per trainable entry (float32 whatever the
parameter dtype, in ``optimizer.state[p]["hessian"]``, created at the first step), and
temporaries of a few pieces of z (at most ``TEMP_ELEMENTS`` entries each): every move is made
piece by piece, ``theta_piece += c * z_piece * rsqrt(S_piece)``, z regenerated from the seed
(the random-seed trick). The paper reports 8x fewer steps than MeZO on SST-2 (RoBERTa-large)
with better accuracy.

**Exact mode** (bf16/fp16 parameters) is supported: the hooks build the perturbed copy
``theta + c S^{-1/2} z`` piece by piece; S is float32 throughout.

**No replay.** S depends on L0 and on the curvature terms, which the trajectory record (seeds,
g, lr, loss) does not hold: ``replayable = False``, so a run is checkpointed as tensors
(weights and ``state_dict``, S included) and :meth:`HiZOO.replay` refuses in one line.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.zo.directions import Piece, local_part, signed_z
from ftlab.zo.mezo import LossAt, MeZO, ZOStep, buffer_dtype, f32
from ftlab.zo.variants import estimate_direction

HESSIAN_SMOOTHING = 1e-8  # the authors' scripts' default smoothing schedule (constant 1e-8)

# update(seeds, g, c, lr): S <- EMA with the curvature terms c; theta <- theta - lr (...)
CurvatureUpdate = Callable[[list[int], list[float], list[float], float], None]


def hizoo(seeds: list[int], loss: LossAt, update: CurvatureUpdate, *, lr: float, eps: float,
          mean: Callable[[list[float]], list[float]] = lambda values: values) -> ZOStep:
    """One HiZOO step (the module docstring's pseudocode) given the operations on theta, as
    :func:`ftlab.zo.mezo.mezo`: ``loss(seed, c)`` evaluates the loss at ``theta + c S^{-1/2} z``
    (at theta for seed None) and ``update`` updates S and theta. The losses are averaged over
    data-parallel ranks (one all-reduce of 2n + 1 floats). Returns the step's record."""
    base = loss(None, 0.0)
    pluses, minuses = [], []
    for seed in seeds:
        pluses.append(loss(seed, eps))
        minuses.append(loss(seed, -eps))
    base, *rest = mean([base] + pluses + minuses)
    pluses, minuses = rest[:len(seeds)], rest[len(seeds):]
    grads = [f32((p - m) / (2 * eps)) for p, m in zip(pluses, minuses)]
    curvatures = [f32(abs(p + m - 2 * base) / (2 * eps * eps)) for p, m in zip(pluses, minuses)]
    plus = pluses[0]
    if not all(math.isfinite(x) for x in grads + curvatures + [plus]):
        grads, curvatures, lr, plus = [0.0] * len(seeds), [0.0] * len(seeds), 0.0, math.nan
    update(seeds, grads, curvatures, lr)
    return ZOStep(seeds, grads, lr, plus)


class HiZOO(MeZO):
    """HiZOO (see the module docstring): MeZO preconditioned by a diagonal Hessian estimate S.

    Args:
        params, lr, eps, weight_decay, n_perturbations, generator, seed, chunk_size, exact: as
            :class:`ftlab.zo.MeZO` (``one_sided`` and Rademacher z are refused: the curvature
            needs both sides and Gaussian z).
        hessian_smoothing: alpha, the weight of each step's curvature estimate in the moving
            average of S, in (0, 1). Default 1e-8 (the authors' scripts; they tried 1e-6 to 1e-12).
    """

    replayable = False  # S depends on L0 and the curvature terms, which the log does not hold
    extra_bytes_per_entry = 4  # S, float32
    buffers = ("hessian",)

    def __init__(self, params: Iterable, hessian_smoothing: float = HESSIAN_SMOOTHING, **kwargs: Any) -> None:
        if not 0.0 < hessian_smoothing < 1.0:
            raise FtlabError(f"HiZOO needs hessian_smoothing in (0, 1) (got {hessian_smoothing})")
        if kwargs.get("one_sided"):
            raise FtlabError("HiZOO needs both L+ and L- (its curvature estimate): one_sided is not supported")
        if kwargs.get("distribution", "gaussian") != "gaussian":
            raise FtlabError("HiZOO needs gaussian z: with rademacher z (z^2 = 1) the curvature "
                             "estimate cannot tell entries apart")
        super().__init__(params, **kwargs)
        self.hessian_smoothing = hessian_smoothing

    @property
    def forwards_per_step(self) -> int:
        """2n + 1: L0 once, then L+ and L- per seed."""
        return 2 * self.n + 1

    # -- S: the diagonal Hessian estimate ------------------------------------------------------
    def hessian(self, p: Tensor) -> Tensor:
        """S of parameter ``p`` (its local shard), created at ones (the paper's Sigma_0 = I)."""
        state = self.state[p]
        if "hessian" not in state:
            local = local_part(p)[0]
            state["hessian"] = torch.ones(local.shape, dtype=buffer_dtype(p), device=local.device)
        return state["hessian"]

    def _pieces(self, step_seed: int, index: int, p: Tensor) -> Iterable[tuple[Tensor, Tensor, Piece]]:
        """``(theta, S, piece)`` per piece of z: views of the flat local theta and S there."""
        flat, hessian = local_part(p)[0].detach().view(-1), self.hessian(p).view(-1)
        for piece in self._z_chunks(step_seed, index, p, bounded=True):
            shape = piece.z.shape
            yield flat[piece.where].view(shape), hessian[piece.where].view(shape), piece

    # -- the step --------------------------------------------------------------------------------
    def _algorithm(self, seeds: list[int], closure: Callable[[], Tensor], lr: float) -> ZOStep:
        """One step of :func:`hizoo` (a skipped step leaves S unchanged); its loss is L+."""
        return hizoo(seeds, self._evaluator(closure), self._curvature_update, lr=lr, eps=self.eps, mean=self._mean)

    def replay(self, record: ZOStep) -> None:
        raise FtlabError("HiZOO steps cannot be replayed: its Hessian estimate depends on losses the trajectory "
                         "log does not hold")

    @torch.no_grad()
    def _apply(self, step_seed: int, z_scale: float, update: float = 0.0, decay_lr: float = 0.0) -> None:
        """The in-place perturbation moves of the evaluator: ``theta += z_scale S^{-1/2} z``,
        piece by piece (the update is :meth:`_curvature_update`)."""
        assert update == 0.0 and decay_lr == 0.0, "HiZOO updates in _curvature_update"
        for index, p, _ in self._params():
            for theta, hessian, piece in self._pieces(step_seed, index, p):
                theta.add_(signed_z(piece, z_scale, hessian.dtype).mul_(hessian.rsqrt()))

    @torch.no_grad()
    def perturbed(self, step_seed: int, index: int, p: Tensor, coef: float) -> Tensor:
        """Exact mode: a new tensor ``theta + coef S^{-1/2} z`` (theta is not written)."""
        out = torch.empty_like(local_part(p)[0], memory_format=torch.contiguous_format)
        flat = out.view(-1)
        for theta, hessian, piece in self._pieces(step_seed, index, p):
            move = signed_z(piece, coef, hessian.dtype).mul_(hessian.rsqrt())
            flat[piece.where].view(theta.shape).copy_(move.add_(theta))
        return out

    @torch.no_grad()
    def _curvature_update(self, seeds: list[int], grads: list[float], curvatures: list[float], lr: float) -> None:
        """:func:`hizoo`'s update, one pass over each parameter, piece by piece: undo the last
        seed's in-place perturbation (with the old S), decay, update S, move theta along the new
        ``S^{-1/2} d`` with ``d = (1/n) sum_s g_s z(s)``. A skipped step only restores theta."""
        n, restore, alpha = len(seeds), self._restore, self.hessian_smoothing
        skipped = lr == 0.0 and not any(grads) and not any(curvatures)
        gs, cs = [g / n for g in grads], [alpha * c / n for c in curvatures]
        for index, p, wd in self._params():
            for parts in zip(*(self._pieces(seed, index, p) for seed in seeds)):  # the same entries
                theta, hessian, _ = parts[0]
                z = [piece for _, _, piece in parts]  # each seed's z there
                if restore:
                    theta.add_(signed_z(z[-1], restore, hessian.dtype).mul_(hessian.rsqrt()))
                if skipped:
                    continue
                if lr * wd:
                    theta.mul_(1.0 - lr * wd)
                # S <- S * ((1 - alpha) + alpha (1/n) sum_s c_s z_s^2)
                factor = torch.full_like(hessian, 1.0 - alpha)
                for piece, c in zip(z, cs):
                    zs = signed_z(piece, 1.0, hessian.dtype)
                    factor.addcmul_(zs, zs, value=c)
                hessian.mul_(factor)
                theta.add_(estimate_direction(tuple(z), gs, hessian.dtype).mul_(hessian.rsqrt()), alpha=-lr)

    # -- checkpoints: S stays float32 --------------------------------------------------------------
