"""LOZO and LOZO-M: zeroth-order fine-tuning with low-rank perturbations (Chen et al.,
"Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures", ICLR 2025).

Each 2-D weight W (m x n) is perturbed along a rank-r matrix ``Z = U V^T`` instead of a full
Gaussian z; every other tensor (biases, norms: 1-D) keeps MeZO's z (its generator, distribution
and chunks), as in the paper. ``U`` (m x r) is fresh every step (from the step seed); ``V``
(n x r) is *lazily* resampled, every ``refresh_every`` (nu) steps: the steps of one "subspace"
k = t // nu share ``V_k``. One step t, for each of its S step seeds s (n-SPSA, S = n_perturbations)::

    U_s = N(0, 1)^(m x r) from seed (s, parameter)         # fresh each step
    V_k = N(0, 1)^(n x r) from seed (optimizer seed, k)     # the same for nu steps
    W += eps U_s V_k^T ; L+ = loss ; W -= 2 eps U_s V_k^T ; L- = loss   (1-D tensors: MeZO's z)
    g_s = (L+ - L-) / (2 eps)
    # LOZO:
    W <- W + eps U V^T  -  lr (1/(S r)) sum_s g_s U_s V_k^T           (restore fused with the update)
    # LOZO-M: momentum N (m x r) kept in the low-rank space
    at a refresh (t = k nu, k > 0):  N <- N V_{k-1}^T V_k / n          (momentum carried into the new subspace)
    N <- beta N + (1 - beta) (1/S) sum_s g_s U_s
    W <- W + eps U V^T  -  (lr / r) N V_k^T

E[Z Z^T] = r I (vectorised) for Gaussian U and V, so ``g U V^T / r`` is an unbiased estimate of
the gradient once V is averaged over; with V held fixed it is the gradient projected on V's
columns, ``G V V^T / r``: LOZO is then a random subspace method, ZO-SGD on ``U`` with ``V``
fixed. 1-D tensors are updated as MeZO (LOZO) or with the same dampened momentum (LOZO-M), in a
full-size float32 buffer. Rademacher ``distribution`` makes U and V +-1 entries.

Moves are in place and make no matrix-sized temporary: ``W.addmm_(U, V.T, alpha=c)`` for the
perturbations, and ``W.mul_(1 - lr wd).addmm_(D, V.T)`` with ``D`` (m x r) the combination of
``U``s (and ``N``) for the fused restore + decay + update. In exact mode (bf16/fp16), a
module's perturbed weight is ``torch.addmm(W, U, V.T, alpha=c)`` (a copy, as MeZO's).

Factors: U and V are drawn on the CPU in float32 from ``torch.Generator`` seeds (so any device
draws the same numbers), then moved to the parameter's device and dtype. U of parameter i at
step seed s uses ``param_seed(s, i)``; V of subspace k uses ``param_seed(subspace_seed(seed, k),
i)``. A step is therefore a function of its seeds, the optimizer's seed and step count, and its
logged g and lr: :meth:`replay` rebuilds weights and momentum bit for bit, V refreshes included
(``step`` and ``replay`` both advance the step count when they begin).

Memory (m x n matrices, ``b`` bytes per parameter entry, S seeds a step):
* ``V``: ``r n b`` per matrix, kept between steps (regenerable: not checkpointed).
* ``U``: ``S r m b`` per matrix during a step (reused by its three passes).
* ``D``: at most three ``r m`` temporaries (float32, and its cast) at a time in the update.
* LOZO-M: ``N`` ``r m`` float32 per matrix, and 4 bytes per entry of each 1-D tensor.
So ``r (S m + n)`` entries per matrix (plus ``r m`` float32 for LOZO-M), against MeZO's zero; :meth:`cost` states the
total for the optimizer's parameters and ``extra_bytes_per_entry`` per trainable entry.
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.zo.directions import add_z, param_seed
from ftlab.zo.mezo import MeZO, buffer_dtype
from ftlab.zo.variants import estimate_direction, is_skipped


def subspace_seed(seed: int, k: int) -> int:
    """The seed of subspace k's V (32-bit; string seeding is stable across processes)."""
    return random.Random(f"lozo-v/{seed}/{k}").getrandbits(32)


def factor(seed: int, index: int, rows: int, rank: int, distribution: str, like: Tensor) -> Tensor:
    """A (rows x rank) factor: N(0, 1) (or +-1) draws in float32 on the CPU from
    ``param_seed(seed, index)``, moved to ``like``'s device and dtype."""
    x = torch.randn(rows, rank, generator=torch.Generator().manual_seed(param_seed(seed, index)))
    if distribution == "rademacher":
        x = torch.where(x >= 0, 1.0, -1.0)
    return x.to(device=like.device, dtype=like.dtype)


def _is_sharded(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


class LOZO(MeZO):
    """LOZO: MeZO with rank-``rank`` perturbations ``U V^T`` of each 2-D weight, V resampled
    every ``refresh_every`` steps (see the module docstring). Other arguments as :class:`MeZO`."""

    momentum: float | None = None  # LOZO-M's beta (None: plain LOZO)

    def __init__(self, params: Iterable, rank: int = 2, refresh_every: int = 50, **kwargs: Any) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FtlabError(f"LOZO needs rank >= 1 (got {rank})")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise FtlabError(f"LOZO needs refresh_every >= 1 (steps between V refreshes; got {refresh_every})")
        super().__init__(params, **kwargs)
        if any(_is_sharded(p) for _, p, _ in self._params()):
            raise FtlabError(f"{type(self).__name__} does not handle sharded (DTensor) parameters; "
                             "use optimizer=mezo with sharding")
        self.rank, self.refresh_every = rank, refresh_every
        self.v_seed = kwargs.get("seed", 0)  # V of subspace k: from subspace_seed(v_seed, k)
        self._t = 0  # steps begun (step or replay); this step's subspace is _k
        self._k = 0
        self._v: dict[int, tuple[int, Tensor]] = {}  # parameter index -> (k, V_k): a cache
        self._u: dict[tuple[int, int], Tensor] = {}  # (step seed, index) -> U: this step's

    # -- the factors ----------------------------------------------------------------------------
    def _V(self, index: int, p: Tensor, k: int | None = None) -> Tensor:
        k = self._k if k is None else k
        cached = self._v.get(index)
        if cached is None or cached[0] != k:
            cached = (k, factor(subspace_seed(self.v_seed, k), index, p.shape[1], self.rank, self.distribution, p))
            if k == self._k:
                self._v[index] = cached
        return cached[1]

    def _U(self, step_seed: int, index: int, p: Tensor) -> Tensor:
        key = (step_seed, index)
        if key not in self._u:
            self._u[key] = factor(step_seed, index, p.shape[0], self.rank, self.distribution, p)
        return self._u[key]

    def z_spec(self) -> dict:
        return {**super().z_spec(), "rank": self.rank, "refresh_every": self.refresh_every}

    # -- a step ---------------------------------------------------------------------------------
    def _begin_step(self) -> None:
        """Both ``step`` and ``replay`` begin here once: advance the step count (a V refresh
        when it starts a subspace; LOZO-M carries its momentum over to the new V)."""
        super()._begin_step()
        self._u.clear()
        self._k = self._t // self.refresh_every
        if self._t % self.refresh_every == 0 and self._t > 0:
            self._refresh()
        self._t += 1

    def _refresh(self) -> None:
        """V_{k-1} -> V_k (plain LOZO keeps nothing in the old subspace)."""

    @torch.no_grad()
    def _apply(self, step_seed: int, z_scale: float, update: float = 0.0, decay_lr: float = 0.0) -> None:
        """theta <- (theta + z_scale z) (1 - decay_lr wd) + update z, z = U V^T for matrices."""
        for index, p, wd in self._params():
            keep = 1.0 - decay_lr * wd
            if keep != 1.0:
                p.mul_(keep)
            if p.ndim == 2:
                p.addmm_(self._U(step_seed, index, p), self._V(index, p).T, alpha=keep * z_scale + update)
            else:
                for theta, piece in self._moves(step_seed, index, p):
                    add_z(theta, piece, keep * z_scale + update)

    @torch.no_grad()
    def perturbed(self, step_seed: int, index: int, p: Tensor, coef: float) -> Tensor:
        """Exact mode: a new ``W + coef U V^T`` (W not written); 1-D tensors as MeZO."""
        if p.ndim != 2:
            return super().perturbed(step_seed, index, p, coef)
        return torch.addmm(p, self._U(step_seed, index, p), self._V(index, p).T, alpha=coef)

    @torch.no_grad()
    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Restore the last seed's perturbation fused with decay and the update, one pass per tensor."""
        try:
            if is_skipped(grads, lr):  # a non-finite loss: only restore (momentum untouched)
                if self._restore:
                    self._apply(seeds[-1], self._restore)
                return
            n, restore = len(seeds), self._restore
            for index, p, wd in self._params():
                keep = 1.0 - lr * wd
                if p.ndim == 2:
                    us = [self._U(s, index, p) for s in seeds]
                    d = self._matrix_direction(index, p, us, [g / n for g in grads], lr)
                    if restore:
                        d = d.add(us[-1], alpha=keep * restore)
                    if keep != 1.0:
                        p.mul_(keep)
                    p.addmm_(d.to(p.dtype), self._V(index, p).T)
                else:
                    self._update_vector(index, p, seeds, [g / n for g in grads], lr, keep, restore)
        finally:
            self._u.clear()

    def _matrix_direction(self, index: int, p: Tensor, us: list[Tensor], coefs: list[float], lr: float) -> Tensor:
        """D (m x r) with ``W -= D V^T`` the update: ``(lr / r) sum_s coef_s U_s``."""
        d = torch.zeros_like(us[0], dtype=buffer_dtype(p))
        for u, c in zip(us, coefs):
            d.add_(u, alpha=-lr * c / self.rank)
        return d

    def _update_vector(self, index: int, p: Tensor, seeds: list[int], coefs: list[float], lr: float,
                       keep: float, restore: float) -> None:
        """MeZO's update of a 1-D tensor: restore fused with decay and the last seed's update."""
        if keep != 1.0:
            p.mul_(keep)
        for theta, piece in self._moves(seeds[-1], index, p):
            add_z(theta, piece, keep * restore - lr * coefs[-1])
        for seed, c in zip(seeds[:-1], coefs[:-1]):
            for theta, piece in self._moves(seed, index, p):
                add_z(theta, piece, -lr * c)

    # -- cost and checkpoints -----------------------------------------------------------------
    def extra_bytes(self) -> int:
        """Bytes beyond inference memory at the peak of a step (see the module docstring)."""
        total, temporary = 0, 0
        for _, p, _ in self._params():
            if p.ndim == 2:
                (m, n), b, b32 = p.shape, p.element_size(), buffer_dtype(p).itemsize
                total += self.rank * (n + self.n * m) * b  # V (kept), this step's Us
                temporary = max(temporary, self.rank * m * (2 * b32 + b))  # D, its sum, its cast
                if self.momentum is not None:
                    total += self.rank * m * b32  # N
            elif self.momentum is not None:
                total += p.numel() * buffer_dtype(p).itemsize
        return total + temporary

    @property
    def extra_bytes_per_entry(self) -> float:  # type: ignore[override]
        entries = sum(p.numel() for _, p, _ in self._params())
        return round(self.extra_bytes() / max(entries, 1), 4)

    def cost(self) -> str:
        return (f"{type(self).__name__}: {self.forwards_per_step} forwards a step, {self.extra_bytes()} extra "
                f"bytes ({self.extra_bytes_per_entry} per trainable entry; rank {self.rank} factors)")

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["lozo"] = {"step": self._t, "v_seed": self.v_seed}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        lozo = state_dict.pop("lozo")
        super().load_state_dict(state_dict)
        self._t, self.v_seed = int(lozo["step"]), int(lozo["v_seed"])
        self._v.clear()


class LOZOM(LOZO):
    """LOZO-M: LOZO with momentum ``beta`` kept in the low-rank space, ``N`` (m x r, float32,
    ``state[p]["momentum"]``) per matrix, carried into each new subspace as ``N V_{k-1}^T V_k / n``
    (see the module docstring); 1-D tensors: a full float32 buffer, the same dampened rule."""

    buffers = ("momentum",)

    def __init__(self, params: Iterable, momentum: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 <= momentum < 1.0:
            raise FtlabError(f"LOZO-M momentum must be in [0, 1) (got {momentum})")
        super().__init__(params, **kwargs)
        self.momentum = momentum

    def _buffer(self, p: Tensor, shape: tuple[int, ...]) -> Tensor:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros(shape, dtype=buffer_dtype(p), device=p.device)
        return state["momentum"]

    @torch.no_grad()
    def _refresh(self) -> None:
        for index, p, _ in self._params():
            if p.ndim == 2 and "momentum" in self.state[p]:
                old, new = self._V(index, p, self._k - 1), self._V(index, p)
                carry = old.to(buffer_dtype(p)).T @ new.to(buffer_dtype(p)) / p.shape[1]
                self.state[p]["momentum"] = self.state[p]["momentum"] @ carry

    def _matrix_direction(self, index: int, p: Tensor, us: list[Tensor], coefs: list[float], lr: float) -> Tensor:
        """N <- beta N + (1 - beta) sum_s coef_s U_s; D = (lr / r) N."""
        beta = self.momentum
        assert beta is not None
        m = self._buffer(p, (p.shape[0], self.rank))
        m.mul_(beta)
        for u, c in zip(us, coefs):
            m.add_(u, alpha=(1 - beta) * c)
        return m.mul(-lr / self.rank)

    def _update_vector(self, index: int, p: Tensor, seeds: list[int], coefs: list[float], lr: float,
                       keep: float, restore: float) -> None:
        """Chunk by chunk: restore, decay, m <- beta m + (1 - beta) d, theta -= lr m."""
        beta = self.momentum
        assert beta is not None
        flat, m = p.detach().view(-1), self._buffer(p, tuple(p.shape)).view(-1)
        for pieces in zip(*(self._z_chunks(seed, index, p, bounded=True) for seed in seeds)):
            where, shape = pieces[0].where, pieces[0].z.shape
            theta, buf = flat[where].view(shape), m[where].view(shape)
            if restore:
                add_z(theta, pieces[-1], restore)
            if keep != 1.0:
                theta.mul_(keep)
            buf.mul_(beta).add_(estimate_direction(pieces, coefs, buf.dtype), alpha=1 - beta)
            theta.add_(buf, alpha=-lr)
