"""Guided MeZO: MeZO-GV (Jin, Cen and Tan, "Steering the Noise: Turning Random Perturbations
into Effective Descent for Memory-Efficient LLM Fine-Tuning", arXiv 2601.04710): a pool of
candidate perturbations is evaluated, and the step is taken along a *guiding vector* that
contrasts the low-loss candidates with the high-loss ones.

One step, for a pool of M seeds (z_i regenerated from seed i, as in MeZO) and k = floor(alpha M)
elite candidates (``elite_fraction`` alpha, k clamped to 1..M-1)::

    L_i = loss(theta + eps z_i)              for i = 1..M       # M forwards: the pool
    L = mean over data-parallel ranks (L)                       # all-reduce 1: M floats
    E = the k smallest L_i (ties: lower i)                      # the elite group; R = the others
    v = s (mean_{i in E} z_i - mean_{i in R} z_i)               # the guiding vector
      = sum_i c_i z_i,  c_i = s/k (elite) or -s/(M-k) (rest)
      (v and -v give the same step below: v is oriented so that c_1 > 0)
    L+ = loss(theta + eps v), L- = loss(theta - eps v)          # 2 forwards
    d, S = mean over ranks (L+ - L-, L+ + L-)                   # all-reduce 2: 2 floats
    g = float32(d / (2 eps))                                    # projected gradient along v
    g_i = float32(M c_i g)                                      # logged per seed (see below)
    if an L_i, g_i or S is not finite: skip (theta is only restored; lr logged 0)
    theta <- theta (1 - lr wd) - lr (1/M) sum_i g_i z_i        # = theta (1 - lr wd) - lr g v

Forwards per step: M + 2 (M = ``pool_size``). Extra memory: none (v is never materialised: it
is the seeds' z with coefficients c_i, applied one seed at a time). Parameter passes per step,
in place: about 5M (pool: 2M - 1; theta +- eps v and the fused restore + update: M each), against
MeZO's 3; in exact mode each hooked module builds its perturbed copy from M pieces of z.

**The scale s** = 1 / sqrt(1/k + 1/(M-k)) (not in the paper, whose v is the bare difference of
means) makes the isotropic part of v as large as one z, so ``lr`` and ``eps`` keep MeZO's
meaning (the paper's v is ours divided by s: its lr is ours times s^2, its eps ours times s).

**What guidance buys, honestly.** E[g v] is along the gradient for Gaussian z (the selection
depends on z only through z.grad), so the step is an unbiased direction up to a positive scale,
and each step's v is much better aligned with the gradient than one z: with exact losses,
cos^2(v, grad) tends to (2/pi) M / d for alpha = 1/2 (measured: 4.5 / d for M = 8), against
1 / d for MeZO's z (d: trainable entries). Per *forward* the gain is smaller, because v lies in
the span of the pool's z and the pool's forwards serve only to rank the candidates: at best
(large M) about 1.27x MeZO's loss decrease per forward ((2/pi) / (1/2)) on a noiseless quadratic.
Measured on a 200-dimensional quadratic at each method's best lr, for the same forwards: M = 8
ends about 1.3x *above* MeZO's loss, M = 16 (the default) 1.1-1.3x below, M = 32 1.5-2x below;
for the same number of steps, far below (4-60x). So the method pays off most where steps, not
forwards, are what is scarce, and its default pool is 16; it is not a free variance reduction.
(The paper reports its gains on LLM fine-tuning; they were not reproduced here.)

**The log and bitwise replay.** Each record keeps MeZO's meaning (theta -= lr (1/M) sum g_i z_i,
with g_i = M c_i g), so the step is a function of (seeds, g_i, lr). An in-place replay must also
redo the perturbation moves, which need the c_i: they are recovered from the *sign bits* of the
g_i (the seeds whose g_i has the sign bit of g_1 form c_1's group; the group sizes give s and
|c_i|). Signed zeros keep this exact when g is 0, and a step skipped at the guided probes logs
g_i = copysign(0, c_i); a step skipped at the pool (no guided probes made) logs all g_i = +0,
which no guided step can produce (both groups are non-empty). The replay redoes the same moves
and the same update from these numbers, so theta ends bit for bit where the step left it.

**Data parallel**: every rank draws the same pool; the pool losses are averaged over the ranks
before the ranking (so every rank picks the same v) and the guided differences after, one
all-reduce each (:meth:`MeZO._mean`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.zo.directions import add_z, local_part
from ftlab.zo.mezo import LossAt, MeZO, Update, ZOStep, f32

Direction = tuple[tuple[int, float], ...]  # v = sum_i c_i z(seed_i), as (seed_i, c_i) pairs


def _coefficients(first_group: list[bool]) -> list[float]:
    """The c_i of v: ``s/|G|`` for the members of c_1's group G, ``-s/(M-|G|)`` for the others,
    with s = 1 / sqrt(1/|G| + 1/(M-|G|)) (symmetric in the two groups)."""
    m, size = len(first_group), sum(first_group)
    s = 1.0 / math.sqrt(1.0 / size + 1.0 / (m - size))
    return [s / size if member else -s / (m - size) for member in first_group]


def guiding_coefficients(losses: list[float], elite: int) -> list[float]:
    """The c_i of the guiding vector from the pool's losses: the ``elite`` lowest losses (ties:
    the lower index) against the rest, oriented so that c_1 > 0."""
    order = sorted(range(len(losses)), key=lambda i: (losses[i], i))
    top = set(order[:elite])
    return _coefficients([(i in top) == (0 in top) for i in range(len(losses))])


def coefficients_from_grads(grads: list[float]) -> list[float] | None:
    """The c_i of a logged guided step, from the sign bits of its projected gradients (see the
    module docstring); None for a step skipped at the pool (all sign bits equal)."""
    negative = [math.copysign(1.0, g) < 0 for g in grads]
    first_group = [n == negative[0] for n in negative]
    if all(first_group):
        return None
    return _coefficients(first_group)


def guided_mezo(seeds: list[int], loss: LossAt, update: Update, *, lr: float, eps: float, elite: int,
                mean: Callable[[list[float]], list[float]] = lambda values: values) -> ZOStep:
    """One MeZO-GV step (the module docstring's pseudocode) given MeZO's operations on theta:
    ``loss(direction, c)`` evaluates the model at theta + c * direction (a seed's z, or v as a
    tuple of (seed, c_i) pairs), ``update(seeds, g, lr)`` restores and moves theta. ``loss`` is
    called in this order (pool, then +v, then -v), as :meth:`GuidedMeZO.replay` calls it.
    Returns the record: the seeds, g_i = M c_i g, lr, and the loss (L+ + L-) / 2, theta's loss
    up to O(eps^2)."""
    m = len(seeds)
    pool = mean([loss(seed, eps) for seed in seeds])
    if not all(math.isfinite(x) for x in pool):
        grads = [0.0] * m  # all sign bits equal: "skipped at the pool"
        update(seeds, grads, 0.0)
        return ZOStep(seeds, grads, 0.0, math.nan)
    cs = guiding_coefficients(pool, elite)
    v: Direction = tuple(zip(seeds, cs))
    plus = loss(v, eps)  # type: ignore[arg-type]
    minus = loss(v, -eps)  # type: ignore[arg-type]
    diff, total = mean([plus - minus, plus + minus])
    g = f32(diff / (2 * eps))
    grads = [f32(m * c * g) for c in cs]
    value = total / 2
    if not all(math.isfinite(x) for x in grads + [value]):
        grads, lr, value = [math.copysign(0.0, c) for c in cs], 0.0, math.nan
    update(seeds, grads, lr)
    return ZOStep(seeds, grads, lr, value)


class GuidedMeZO(MeZO):
    """MeZO-GV: MeZO along a guiding vector formed from a pool of ``pool_size`` candidate
    perturbations (see the module docstring for the algorithm, its cost and its limits).

    Forwards per step: ``pool_size + 2``. Extra memory: none (0 bytes per trainable entry).
    Replays bitwise from its trajectory log, in place and in exact mode.

    Args:
        pool_size: M, candidates evaluated per step (>= 2: an elite and a rest).
        elite_fraction: alpha in (0, 1); the elite group is the floor(alpha M) lowest losses
            (clamped to 1..M-1). 0.5 (the default) aligns v best for a given M.
        **kwargs: MeZO's (lr, eps, weight_decay, distribution, generator, seed, chunk_size,
            exact). ``n_perturbations`` must be 1 and ``one_sided`` False: the pool replaces them.
    """

    def __init__(self, params: Iterable, pool_size: int = 16, elite_fraction: float = 0.5, **kwargs: Any) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 2:
            raise FtlabError(f"guided MeZO needs pool_size >= 2 (an elite and a rest to contrast; got {pool_size!r})")
        if not 0.0 < elite_fraction < 1.0:
            raise FtlabError(f"guided MeZO needs elite_fraction in (0, 1) (got {elite_fraction!r})")
        if kwargs.pop("n_perturbations", 1) != 1 or kwargs.pop("one_sided", False):
            raise FtlabError("guided MeZO takes one guided direction a step with a central difference: "
                             "set zo.pool_size, not n_perturbations > 1 or one_sided")
        super().__init__(params, n_perturbations=pool_size, **kwargs)
        self.pool_size, self.elite_fraction = pool_size, elite_fraction
        self.elite = min(pool_size - 1, max(1, math.floor(elite_fraction * pool_size)))

    @property
    def forwards_per_step(self) -> int:
        """The pool's M forwards and the guided pair."""
        return self.pool_size + 2

    # -- moves along v = sum_i c_i z_i, one seed at a time ----------------------------------
    def _apply(self, step_seed: int | Direction, z_scale: float, update: float = 0.0,  # type: ignore[override]
               decay_lr: float = 0.0) -> None:
        """MeZO's in-place move, also along v (a tuple of (seed, c_i) pairs): ``z_scale * c_i``
        along each seed's z in turn (what MeZO's evaluator asks for when it moves to or along v)."""
        if not isinstance(step_seed, tuple):
            return super()._apply(step_seed, z_scale, update, decay_lr)
        assert update == 0.0 and decay_lr == 0.0  # the update is _update's own pass
        for seed, c in step_seed:
            super()._apply(seed, z_scale * c)

    @torch.no_grad()
    def perturbed(self, step_seed: int | Direction, index: int, p: Tensor, coef: float) -> Tensor:  # type: ignore[override]
        """Exact mode's out-of-place ``theta + coef * z``, also along v: one ``addcmul`` per piece
        for the first seed (reading theta), then one ``addcmul_`` per piece for each other."""
        if not isinstance(step_seed, tuple):
            return super().perturbed(step_seed, index, p, coef)
        (first, c1), *rest = step_seed
        out = super().perturbed(first, index, p, coef * c1)
        for seed, c in rest:
            for theta, piece in self._moves(seed, index, p):
                add_z(out.as_strided(theta.shape, theta.stride(), piece.where.start), piece, coef * c)
        return out

    # -- the step ------------------------------------------------------------------------------
    def _algorithm(self, seeds: list[int], closure: Callable[[], Tensor], lr: float) -> ZOStep:
        """One step of :func:`guided_mezo`; its loss is (L+ + L-) / 2."""
        return guided_mezo(seeds, self._evaluator(closure), self._update, lr=lr, eps=self.eps, elite=self.elite,
                           mean=self._mean)

    @torch.no_grad()
    def replay(self, record: ZOStep) -> None:
        """Redo a logged step without forwards: the pool's moves, the moves along v (its c_i read
        from the logged g_i's sign bits) and the update, so theta ends bit for bit where it did."""
        self._begin_step()
        loss = self._evaluator(None)
        for seed in record.seeds:
            loss(seed, self.eps)
        cs = coefficients_from_grads(record.grads)
        if cs is not None:
            v = tuple(zip(record.seeds, cs))
            loss(v, self.eps)  # type: ignore[arg-type]
            loss(v, -self.eps)  # type: ignore[arg-type]
        self._update(record.seeds, record.grads, record.lr)
        self._views.clear()

    @torch.no_grad()
    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Restore theta (in place it is at theta - eps v; after a pool-only skip at
        theta + eps z_M) fused with the decay and the update, one parameter at a time:
        ``theta <- theta_now * keep + sum_i (keep * eps * c_i - lr g_i / M) z_i``, keep = 1 - lr wd,
        which is theta * keep - lr (1/M) sum_i g_i z_i."""
        cs = coefficients_from_grads(grads)
        if cs is None:  # skipped at the pool: only the last candidate's perturbation to undo
            if not self.exact:
                self._apply(seeds[-1], -self.eps)
            return
        restore, m = self._restore, len(seeds)
        for index, p, wd in self._params():
            keep = 1.0 - lr * wd
            if keep != 1.0:
                local_part(p)[0].mul_(keep)
            for seed, c, g in zip(seeds, cs, grads):
                coef = keep * restore * c - lr * g / m
                if coef:
                    for theta, piece in self._moves(seed, index, p):
                        add_z(theta, piece, coef)
