"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., 2023), done in place.

One step, for a seed s drawn from the optimizer's own generator and z ~ N(0, I) (or Rademacher)
regenerated from s whenever it is needed (never stored):

    theta += eps * z                 # perturb              (z generated: 1)
    L+ = loss(theta)
    theta -= 2 * eps * z             # perturb the other way (z generated: 2)
    L- = loss(theta)
    g = (L+ - L-) / (2 * eps)        # projected gradient: a scalar
    theta += eps * z - lr * (g * z + wd * theta)   # restore and update, fused (z generated: 3)

The straightforward design restores and then updates in two passes (z generated 4 times, each
with a parameter-sized temporary). Here z is never materialised: with the default ``strided``
generator (:mod:`ftlab.zo.directions`) it is a strided view of a fixed noise table times one
sign per row, so each of the three passes is one ``addcmul_`` per tensor (two with a partial
last row), whatever the tensor's size, and the restore is fused with the update. Memory
therefore equals inference: no gradients, no optimizer state, no temporaries.

``one_sided=True`` uses the forward difference ``g = (L+ - L0) / eps`` with L0 the unperturbed
loss; ``n_perturbations > 1`` averages the estimates of n seeds, all taken at the same theta
(n-SPSA), and applies their updates at the end.

The algorithm itself is the function :func:`mezo` (as ``torch.optim.Adam.step`` calls
``adam()``): it evaluates the losses and forms the projected gradients through two operations
on theta it is given, ``loss(seed, c)`` and ``update(seeds, g, lr)``. :meth:`MeZO.step` passes
the in-place (or exact-mode) moves above; the variants (:mod:`ftlab.zo.variants`) override only
the update, and :class:`ftlab.zo.offload.OffloadedMeZO` the loss (lockstep) and the update (queued).

**Exact mode** (``exact=True``; the default for bf16/fp16 parameters). In low precision
``theta + eps*z - 2*eps*z + eps*z`` does not round back to theta, so in-place MeZO drifts
(silently: the drift is not in the update). In exact mode theta is never moved by a
perturbation: a forward pre-hook on each module that holds trainable parameters points them
at a perturbed copy, ``theta + eps z`` made out of place (one ``addcmul`` per piece: theta is
read once, the copy written once), and a forward hook points them back at theta right after
the module ran (one module's copies exist at a time -- at most the largest module, e.g. the
embedding).
The parameters after a step are therefore exactly what the update alone gives, and a replay
only redoes updates. Call :meth:`MeZO.attach` with the model once.

**Data parallel** (``torch.distributed`` initialised, world size > 1): every rank draws the
same seeds (same ``seed``), evaluates the closure on its own shard of the batch, and one
all-reduce of the n loss differences (plus the loss, for logging) per step replaces gradient
communication; all ranks then apply the same update.
"""

from __future__ import annotations

import functools
import math
import random
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ftlab.config import CHUNK
from ftlab.errors import FtlabError
from ftlab.zo.directions import (
    DISTRIBUTIONS,
    GENERATORS,
    TABLE_SIZE,
    Piece,
    add_z,
    add_z_into,
    chunked_pieces,
    local_part,
    strided_pieces,
)

TEMP_ELEMENTS = 1 << 22  # the largest temporary (entries) a variant makes from one piece of z

def buffer_dtype(p: Tensor) -> torch.dtype:
    """Optimizer buffers are at least float32: bf16/fp16 averages of noisy estimates would
    lose most of their bits."""
    return torch.promote_types(p.dtype, torch.float32)


@dataclass
class ZOStep:
    """What one MeZO step did: enough to replay it exactly (see :mod:`ftlab.zo.trajectory`)."""

    seeds: list[int]
    grads: list[float]  # projected gradient per seed
    lr: float
    loss: float


def f32(x: float) -> float:
    """``x`` rounded to float32: the lr and projected gradients MeZO uses (and logs) exactly."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# loss(seed, c): the loss at theta + c * z(seed) (at theta itself for seed None)
LossAt = Callable[[int | None, float], float]
# update(seeds, g, lr): theta <- theta - lr * ((1/n) sum_k g_k z(seed_k) + wd * theta)
Update = Callable[[list[int], list[float], float], None]


def mezo(seeds: list[int], loss: LossAt, update: Update, *, lr: float, eps: float, one_sided: bool = False,
         mean: Callable[[list[float]], list[float]] = lambda values: values) -> ZOStep:
    """One MeZO step (Malladi et al., 2023, Algorithm 1; n-SPSA over the n ``seeds``), given the
    operations on theta: ``loss`` evaluates the model at a perturbed point, ``update`` moves theta.

        L0 = loss(theta)                                  # one-sided only
        for s in seeds:                                   # every estimate at the same theta
            L+ = loss(theta + eps z(s))
            L- = loss(theta - eps z(s))                   # one-sided: L- = L0
            d_s = L+ - L-
        d, L+ = mean(d, first L+)                         # over data-parallel ranks: one all-reduce
        g_s = float32(d_s / (2 eps))                      # one-sided: d_s / eps
        if a g_s or L+ is not finite: g, lr, L+ = 0, 0, NaN   # skipped: theta is only restored
        theta <- theta - lr ((1/n) sum_s g_s z(s) + wd theta)

    ``loss`` is called in exactly this order, so an in-place ``loss`` may move theta from one
    point to the next and leave it at the last (``update`` then undoes that move with its own);
    :meth:`MeZO.replay` makes the same calls (:func:`loss_differences`) without forwards.
    Returns the step's record (seeds, g, lr, the first L+), what a trajectory log keeps."""
    diffs, plus = loss_differences(seeds, loss, eps, one_sided)
    *diffs, plus = mean(diffs + [plus])
    grads = [f32(d / (eps if one_sided else 2 * eps)) for d in diffs]
    if not all(math.isfinite(x) for x in grads + [plus]):
        grads, lr, plus = [0.0] * len(seeds), 0.0, math.nan
    update(seeds, grads, lr)
    return ZOStep(seeds, grads, lr, plus)


def loss_differences(seeds: list[int], loss: LossAt, eps: float, one_sided: bool) -> tuple[list[float], float]:
    """The forwards of :func:`mezo`: ``L+ - L-`` (one-sided: ``L+ - L0``) along each seed's z,
    and the first ``L+``."""
    base = loss(None, 0.0) if one_sided else 0.0
    diffs, pluses = [], []
    for seed in seeds:
        pluses.append(loss(seed, eps))
        diffs.append(pluses[-1] - (base if one_sided else loss(seed, -eps)))
    return diffs, pluses[0]


class MeZO(torch.optim.Optimizer):
    """ZO-SGD with the random-seed trick. ``step(closure)`` calls ``closure()`` (a forward pass
    returning the loss, run under ``no_grad``) twice per perturbation.

    Args:
        params: parameters or parameter groups (``weight_decay`` per group, as in torch.optim).
        lr, eps: step size and perturbation scale.
        weight_decay: decoupled from the ZO estimate (``theta -= lr * wd * theta``).
        n_perturbations: seeds averaged per step (n-SPSA).
        one_sided: forward difference (n + 1 forwards a step) instead of central (2n).
        distribution: ``"gaussian"`` or ``"rademacher"`` (+-1 entries).
        generator: how z is made (:mod:`ftlab.zo.directions`). ``"strided"`` (default): z of a
            tensor is one strided view of a fixed shared noise table (Salimans et al., 2017)
            times one random sign per row of ``chunk_size`` entries, so every move of a tensor
            is one or two ``addcmul_`` whatever its size (GPU steps are not launch-bound) and
            z is a function of the global element index (the same under any sharding).
            ``"table"``: the earlier design, one table slice and sign per chunk (a loop over
            chunks). ``"torch"``: fresh i.i.d. draws from a ``torch.Generator`` per parameter.
            All three have E[z z^T] = I.
        seed: seeds the optimizer's own generator of step seeds (no global RNG is used).
        chunk_size: entries per row (strided) or per chunk (table, torch: bounds their
            temporaries). Part of z's definition: a replay must use the same value.
        exact: perturb on the fly in module forwards instead of in place (see the module
            docstring); ``None`` turns it on when a trainable parameter is bf16 or fp16.
    """

    zeroth_order = True  # the training loop gives such optimizers a forward-only closure
    replayable = True  # a step is rebuilt from its log record alone (else: tensor checkpoints, no replay)
    extra_bytes_per_entry = 0  # optimizer state per trainable entry, beyond inference memory
    buffers: tuple[str, ...] = ()  # per-parameter state tensors, kept at least float32 (buffer_dtype)
    cache_views = True  # keep a step's strided views between its passes (pieces hold no memory)
    closure_returns = "the loss"  # what step's closure returns (said when it is missing)

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_perturbations: int = 1, one_sided: bool = False, distribution: str = "gaussian",
                 generator: str = "strided", seed: int = 0, chunk_size: int = CHUNK,
                 exact: bool | None = None) -> None:
        if eps <= 0 or lr < 0 or n_perturbations < 1:
            raise FtlabError(f"MeZO needs eps > 0, lr >= 0 and n_perturbations >= 1 "
                             f"(got eps={eps}, lr={lr}, n={n_perturbations})")
        if distribution not in DISTRIBUTIONS:
            raise FtlabError(f"unknown perturbation distribution {distribution!r}; "
                             "choose gaussian or rademacher")
        if generator not in GENERATORS:
            raise FtlabError(f"unknown z generator {generator!r}; choose one of {', '.join(GENERATORS)}")
        if generator != "torch" and not 0 < chunk_size <= TABLE_SIZE:
            raise FtlabError(f"chunk_size must be in 1..{TABLE_SIZE} with the {generator} generator")
        if chunk_size < 1:
            raise FtlabError(f"chunk_size must be >= 1 (got {chunk_size})")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.n, self.one_sided = eps, n_perturbations, one_sided
        self.distribution, self.generator, self.chunk_size = distribution, generator, chunk_size
        self._seeds = random.Random(seed)
        self._views: dict[tuple[int, int], tuple[tuple, list]] = {}  # this step's (theta, z) views
        self.history: list[ZOStep] = []  # filled by step(); a trajectory log drains it
        low = {torch.bfloat16, torch.float16}
        self.exact = any(p.dtype in low for _, p, _ in self._params()) if exact is None else exact
        self._attached = False
        self._active: tuple[int, float] | None = None  # (seed, coefficient) of the exact-mode forward
        self._saved: dict[int, Tensor] = {}  # id(param) -> its value before the exact-mode perturbation
        self._stack: list[list[Tensor]] = []  # parameters each running hooked forward perturbed

    # -- z, regenerated on demand -------------------------------------------------------------
    def _params(self) -> list[tuple[int, Tensor, float]]:
        """(global index, parameter, weight decay) of every parameter, in a fixed order."""
        out, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((index, p, group["weight_decay"]))
                index += 1
        return out

    @property
    def forwards_per_step(self) -> int:
        """Forward passes (closure calls) one step runs: 2n central, n + 1 one-sided."""
        return self.n + 1 if self.one_sided else 2 * self.n

    def cost(self) -> str:
        """One line: forwards per step and extra memory (``ftlab train --show-config`` prints it)."""
        return (f"{type(self).__name__}: {self.forwards_per_step} forwards a step, "
                f"{self.extra_bytes_per_entry} extra bytes per trainable entry")

    def z_spec(self) -> dict:
        """What defines z (a trajectory log records it; a replay with other values is refused)."""
        return {"optimizer": type(self).__name__, "generator": self.generator,
                "distribution": self.distribution, "chunk_size": self.chunk_size}

    def _z_chunks(self, step_seed: int, index: int, p: Tensor, bounded: bool = False) -> Iterable[Piece]:
        """The pieces of z of parameter ``index`` for ``step_seed`` (over the local shard of a
        sharded parameter): ``(where, z, sign)`` with ``where`` a slice of the flat local tensor.
        ``bounded`` splits the strided generator's whole rows into blocks of at most
        ``TEMP_ELEMENTS`` entries (for callers that make temporaries of a piece's size)."""
        local, start, numel = local_part(p)
        if self.generator == "strided":
            max_rows = max(1, TEMP_ELEMENTS // self.chunk_size) if bounded else None
            return strided_pieces(step_seed, index, numel, start, start + local.numel(), self.chunk_size,
                                  self.distribution, local.device, local.dtype, max_rows)
        if start or local.numel() != numel:
            raise FtlabError(f"sharded parameters need zo.generator=strided (z indexed by the global "
                             f"element); got {self.generator!r}")
        return chunked_pieces(self.generator, step_seed, index, numel, self.chunk_size, self.distribution,
                              local.device, local.dtype)

    def _moves(self, step_seed: int, index: int, p: Tensor) -> list[tuple[Tensor, Piece]]:
        """``(theta view, piece)`` pairs of a parameter for a step. The strided generator's are
        views only, made once a step per parameter and reused by its three passes (so a step
        issues a fixed number of operations per tensor); the others are generated each time."""
        local = local_part(p)[0]  # used as it is (no detach: one op less; callers run under no_grad)
        key = (step_seed, index)
        cached = self._views.get(key)
        if cached is not None and cached[0] == (local.data_ptr(), local.device):
            return cached[1]
        moves = [(local.as_strided(piece.z.shape, (piece.z.shape[-1], 1) if piece.z.dim() == 2 else (1,),
                                   local.storage_offset() + piece.where.start), piece)
                 for piece in self._z_chunks(step_seed, index, p)]
        if self.generator == "strided" and self.cache_views:
            self._views[key] = ((local.data_ptr(), local.device), moves)
        return moves

    @torch.no_grad()
    def _apply(self, step_seed: int, z_scale: float, update: float = 0.0, decay_lr: float = 0.0) -> None:
        """theta <- (theta + z_scale * z) * (1 - decay_lr * wd) + update * z, in place, without
        parameter-sized temporaries: ``theta * keep + (keep * z_scale + update) * z``, one
        multiply (when decaying) and one ``addcmul_`` per piece."""
        for index, p, wd in self._params():
            keep = 1.0 - decay_lr * wd
            moves = self._moves(step_seed, index, p)
            if keep != 1.0:
                local_part(p)[0].mul_(keep)
            for theta, piece in moves:
                add_z(theta, piece, keep * z_scale + update)

    # -- checkpoints: the seed generator is part of the state ---------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["seed_generator"] = self._seeds.getstate()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the state tensors named in :attr:`buffers` keep their float32 (torch
        casts state to the parameter's dtype)."""
        state_dict = dict(state_dict)
        version, internal, gauss = state_dict.pop("seed_generator")
        self._seeds.setstate((version, tuple(internal), gauss))
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for index, p, _ in self._params():
            for name in self.buffers:
                if name in saved.get(index, {}):
                    self.state[p][name] = saved[index][name].to(device=p.device, dtype=buffer_dtype(p), copy=True)

    # -- the step ----------------------------------------------------------------------------
    def draw_seeds(self) -> list[int]:
        """The next step's seeds from the optimizer's own generator (32-bit: they are logged)."""
        return [self._seeds.getrandbits(32) for _ in range(self.n)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One step of the optimizer's algorithm (:meth:`_algorithm`; MeZO's: :func:`mezo`);
        returns the step's loss (MeZO: at the first perturbed point, L+). A non-finite loss skips
        the update (theta is restored; the step is logged with lr 0) and the step returns NaN,
        for the caller to count."""
        if closure is None:
            raise FtlabError(f"{type(self).__name__}.step needs a closure returning {self.closure_returns}")
        seeds = self.draw_seeds()
        self._begin_step()
        record = self._algorithm(seeds, closure, f32(self.param_groups[0]["lr"]))
        self._views.clear()
        self.history.append(record)
        return torch.tensor(record.loss)

    def _algorithm(self, seeds: list[int], closure: Callable[[], Tensor], lr: float) -> ZOStep:
        """The estimator's functional core on this optimizer's moves (the other estimators of
        :mod:`ftlab.zo` override this one method)."""
        return mezo(seeds, self._evaluator(closure), self._update, lr=lr, eps=self.eps, one_sided=self.one_sided,
                    mean=self._mean)

    @torch.no_grad()
    def replay(self, record: ZOStep) -> None:
        """Redo a recorded step without forwards: the same parameter moves with the recorded
        projected gradients, so theta ends bit for bit where the original step left it."""
        self._begin_step()
        loss_differences(record.seeds, self._evaluator(None), self.eps, self.one_sided)
        self._update(record.seeds, record.grads, record.lr)
        self._views.clear()

    def _begin_step(self) -> None:
        """Before a step's (or a replay's) first move, theta unperturbed."""
        self._views.clear()

    def _evaluator(self, closure: Callable[[], Tensor] | None) -> LossAt:
        """:func:`mezo`'s ``loss(seed, c)``: the loss at theta + c z(seed) (0.0 without a
        closure: a replay makes the moves only). In place theta is moved there from where the
        previous call left it (the other way along the same seed, or back to theta first, so
        every seed's estimate is taken at the same theta); in exact mode the hooks perturb."""
        if self.exact:
            return functools.partial(self._hooked_loss, closure)
        at_seed, at = None, 0.0  # theta is now perturbed by at * z(at_seed)

        def loss(seed: int | None, coef: float) -> float:
            nonlocal at_seed, at
            if seed != at_seed:
                if at_seed is not None:
                    self._apply(at_seed, -at)
                at_seed, at = seed, 0.0
            if seed is not None:
                self._apply(seed, coef - at)
                at = coef
            return float(closure()) if closure is not None else 0.0
        return loss

    def _hooked_loss(self, closure: Callable[[], Tensor] | None, seed: int | None, coef: float) -> float:
        """Exact mode's ``loss(seed, c)``: the closure run with the hooks perturbing by c z(seed)."""
        if closure is None:
            return 0.0
        if not self._attached:
            raise FtlabError("MeZO in exact mode perturbs inside module forwards: "
                             "call optimizer.attach(model) before step()")
        self._active = None if seed is None else (seed, coef)
        try:
            return float(closure())
        finally:
            self._active = None
            self._restore_all()

    @property
    def _restore(self) -> float:
        """The z coefficient that undoes the in-place perturbation :func:`mezo` leaves theta at
        (along the last seed: -eps, or +eps one-sided); 0 in exact mode (theta never moved)."""
        if self.exact:
            return 0.0
        return -self.eps if self.one_sided else self.eps

    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """:func:`mezo`'s update (ZO-SGD; the variants override it): restore the last seed's
        perturbation fused with its update and the weight decay (one pass), then add the other
        seeds' updates."""
        n = len(seeds)
        self._apply(seeds[-1], self._restore, update=-lr * grads[-1] / n, decay_lr=lr)
        for seed, g in zip(seeds[:-1], grads[:-1]):
            self._apply(seed, -lr * g / n)

    def _mean(self, values: list[float]) -> list[float]:
        """:func:`mezo`'s ``mean``: over the data-parallel ranks."""
        return all_reduce_mean(values, self._device())

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    # -- exact mode: perturbation inside module forwards -------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Hook the modules of ``model`` that hold trainable parameters (exact mode; a no-op
        otherwise). A parameter kept in a ParameterList/Dict is perturbed around the forward of
        the module that holds the list; a tied parameter around each module that uses it."""
        if not self.exact or self._attached:
            return
        index = {id(p): i for i, p, _ in self._params()}
        holders = (nn.ParameterList, nn.ParameterDict)
        for module in model.modules():
            if isinstance(module, holders):
                continue
            lists = [c for c in module.children() if isinstance(c, holders)]
            own = [p for p in module.parameters(recurse=False) if id(p) in index]
            own += [p for c in lists for p in c.parameters() if id(p) in index]
            if own:
                module.register_forward_pre_hook(functools.partial(self._perturb_hook, own, index))
                module.register_forward_hook(self._restore_hook)
        self._attached = True

    @torch.no_grad()
    def perturbed(self, step_seed: int, index: int, p: Tensor, coef: float) -> Tensor:
        """A new tensor ``theta + coef * z`` (parameter ``index``; theta is not written): one
        ``addcmul`` per piece, reading theta and writing the copy once."""
        local = local_part(p)[0]
        out = torch.empty_like(local, memory_format=torch.contiguous_format)
        for theta, piece in self._moves(step_seed, index, p):
            add_z_into(out.as_strided(theta.shape, theta.stride(), piece.where.start), theta, piece, coef)
        return out

    @torch.no_grad()
    def _perturb_hook(self, params: list[Tensor], index: dict[int, int], module: nn.Module, args: tuple) -> None:
        done = []
        if self._active is not None:
            seed, coef = self._active
            for p in params:
                if id(p) in self._saved:  # already perturbed by an enclosing forward
                    continue
                self._saved[id(p)] = p.data  # theta itself is kept, never written
                p.data = self.perturbed(seed, index[id(p)], p, coef)
                done.append(p)
        self._stack.append(done)

    @torch.no_grad()
    def _restore_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        for p in self._stack.pop() if self._stack else []:
            p.data = self._saved.pop(id(p))

    @torch.no_grad()
    def _restore_all(self) -> None:
        """Point back what a forward left perturbed (it raised before its hooks could)."""
        by_id = {id(p): p for _, p, _ in self._params()}
        for key, value in self._saved.items():
            by_id[key].data = value
        self._saved.clear()
        self._stack.clear()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """``values`` averaged over the ranks of the default process group, in one all-reduce
    (returned unchanged without torch.distributed or with one rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()
