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
with a parameter-sized temporary). Here z is generated in bounded chunks from a per-parameter
generator, so no temporary is larger than ``chunk_size`` elements, and the restore is fused with
the update. Memory therefore equals inference: no gradients, no optimizer state.

``one_sided=True`` uses the forward difference ``g = (L+ - L0) / eps`` with L0 the unperturbed
loss; ``n_perturbations > 1`` averages the estimates of n seeds, all taken at the same theta
(n-SPSA), and applies their updates at the end.

**Exact mode** (``exact=True``; the default for bf16/fp16 parameters). In low precision
``theta + eps*z - 2*eps*z + eps*z`` does not round back to theta, so in-place MeZO drifts
(silently: the drift is not in the update). In exact mode theta is never moved by a
perturbation: forward hooks on the modules that hold trainable parameters perturb a module's
parameters just before its forward and copy the saved values back right after it (one
module's parameters are saved at a time -- at most the largest module, e.g. the embedding).
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

from ftlab.errors import FtlabError
from ftlab.zo.settings import CHUNK

TABLE_SIZE, TABLE_SEED = 1 << 20, 20230527  # the shared noise table: 4 MiB in fp32


@functools.lru_cache(maxsize=8)
def noise_table(distribution: str, device: str, dtype: torch.dtype) -> Tensor:
    """The fixed table z is read from with ``generator="table"``: TABLE_SIZE draws made on the
    CPU from TABLE_SEED (so every device sees the same numbers), then moved to ``device``."""
    table = torch.randn(TABLE_SIZE, generator=torch.Generator().manual_seed(TABLE_SEED))
    if distribution == "rademacher":
        table = torch.where(table >= 0, 1.0, -1.0)
    return table.to(device=device, dtype=dtype)


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


def _param_seed(step_seed: int, index: int) -> int:
    # Distinct, well-mixed seeds per (step, parameter), stable across processes and devices.
    return (step_seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


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
        generator: how z is made, chunk by chunk. ``"table"`` (default, fast): each chunk of
            ``chunk_size`` entries is a slice of a fixed shared noise table (Salimans et al.,
            2017) at an offset and with a sign drawn from the seed -- reading memory instead of
            generating numbers, so a step costs little beyond its two forwards; entries within
            a chunk are i.i.d. draws and chunks have independent random signs, so E[z z^T] = I.
            ``"torch"``: fresh i.i.d. draws from a ``torch.Generator`` per parameter.
        seed: seeds the optimizer's own generator of step seeds (no global RNG is used).
        chunk_size: entries of z handled at a time (bounds the temporaries). Part of z's
            definition: a replay must use the same value.
        exact: perturb on the fly in module forwards instead of in place (see the module
            docstring); ``None`` turns it on when a trainable parameter is bf16 or fp16.
    """

    zeroth_order = True  # the training loop gives such optimizers a forward-only closure

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_perturbations: int = 1, one_sided: bool = False, distribution: str = "gaussian",
                 generator: str = "table", seed: int = 0, chunk_size: int = CHUNK,
                 exact: bool | None = None) -> None:
        if eps <= 0 or lr < 0 or n_perturbations < 1:
            raise FtlabError(f"MeZO needs eps > 0, lr >= 0 and n_perturbations >= 1 "
                             f"(got eps={eps}, lr={lr}, n={n_perturbations})")
        if distribution not in ("gaussian", "rademacher"):
            raise FtlabError(f"unknown perturbation distribution {distribution!r}; "
                             "choose gaussian or rademacher")
        if generator not in ("table", "torch"):
            raise FtlabError(f"unknown z generator {generator!r}; choose table or torch")
        if generator == "table" and not 0 < chunk_size <= TABLE_SIZE:
            raise FtlabError(f"chunk_size must be in 1..{TABLE_SIZE} with the table generator")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.n, self.one_sided = eps, n_perturbations, one_sided
        self.distribution, self.generator, self.chunk_size = distribution, generator, chunk_size
        self._seeds = random.Random(seed)
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

    def _z_chunks(self, step_seed: int, index: int, p: Tensor) -> Iterable[tuple[slice, Tensor, float]]:
        """(where, z, sign) for consecutive chunks of parameter ``index``: z * sign is the
        perturbation direction there (the sign is folded into the caller's scalar, so a table
        slice is used as it is, without a copy)."""
        n, size = p.numel(), self.chunk_size
        seed = _param_seed(step_seed, index)
        if self.generator == "table":
            table = noise_table(self.distribution, str(p.device), p.dtype)
            rng = random.Random(seed)
            for start in range(0, n, size):
                length = min(size, n - start)
                offset = rng.randrange(TABLE_SIZE - length + 1)
                sign = 1.0 if rng.getrandbits(1) else -1.0
                yield slice(start, start + length), table[offset:offset + length], sign
            return
        gen = torch.Generator(device=p.device).manual_seed(seed)
        for start in range(0, n, size):
            length = min(size, n - start)
            if self.distribution == "gaussian":
                z = torch.randn(length, generator=gen, device=p.device, dtype=torch.float32)
            else:
                z = torch.randint(0, 2, (length,), generator=gen, device=p.device).float().mul_(2).sub_(1)
            yield slice(start, start + length), z.to(p.dtype), 1.0

    @torch.no_grad()
    def _apply(self, step_seed: int, z_scale: float, update: float = 0.0, decay_lr: float = 0.0) -> None:
        """theta <- (theta + z_scale * z) * (1 - decay_lr * wd) + update * z, in place, in one
        pass over chunks of z (no parameter-sized temporaries)."""
        for index, p, wd in self._params():
            flat = p.data.view(-1)
            keep = 1.0 - decay_lr * wd
            for where, z, sign in self._z_chunks(step_seed, index, p):
                chunk = flat[where]
                if keep != 1.0:
                    chunk.add_(z, alpha=sign * z_scale).mul_(keep).add_(z, alpha=sign * update)
                else:
                    chunk.add_(z, alpha=sign * (z_scale + update))

    # -- checkpoints: the seed generator is part of the state ---------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["seed_generator"] = self._seeds.getstate()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        version, internal, gauss = state_dict.pop("seed_generator")
        self._seeds.setstate((version, tuple(internal), gauss))
        super().load_state_dict(state_dict)

    # -- the step ----------------------------------------------------------------------------
    def draw_seeds(self) -> list[int]:
        """The next step's seeds from the optimizer's own generator (32-bit: they are logged)."""
        return [self._seeds.getrandbits(32) for _ in range(self.n)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One MeZO step; returns the loss at the first perturbed point (L+). A non-finite loss
        skips the update (theta is restored; the step is logged with lr 0) and the step returns
        NaN, for the caller to count."""
        if closure is None:
            raise FtlabError("MeZO.step needs a closure that returns the loss")
        lr = f32(self.param_groups[0]["lr"])
        seeds = self.draw_seeds()
        grads, loss = self._estimate(seeds, closure)
        grads = [f32(g) for g in grads]
        if not all(math.isfinite(x) for x in grads + [loss]):
            # The update below then only restores theta; NaN tells the caller the step was skipped.
            grads, lr, loss = [0.0] * len(seeds), 0.0, math.nan
        self._update(seeds, grads, lr)
        record = ZOStep(seeds, grads, lr, loss)
        self.history.append(record)
        return torch.tensor(loss)

    def _estimate(self, seeds: list[int], closure: Callable[[], Tensor] | None,
                  grads: list[float] | None = None) -> tuple[list[float], float]:
        """Perturb, evaluate and estimate each seed's projected gradient. In place, theta is
        left perturbed by the last seed; in exact mode theta is never moved. With
        ``closure=None`` the same parameter moves are made and the recorded ``grads`` returned
        (replay), so the arithmetic is bit for bit the same."""
        evaluate = self._evaluator(closure)
        base = evaluate(None) if self.one_sided else 0.0
        diffs, first = [], None
        for k, seed in enumerate(seeds):
            plus = evaluate((seed, self.eps))
            first = plus if first is None else first
            if self.one_sided:
                diffs.append(plus - base)
            else:
                diffs.append(plus - evaluate((seed, -self.eps)))
            if k < len(seeds) - 1 and not self.exact:
                self._apply(seed, self._restore)  # every seed's estimate is taken at the same theta
        if grads is not None:
            return grads, first
        *diffs, first = all_reduce_mean(diffs + [first], self._device())
        scale = self.eps if self.one_sided else 2 * self.eps
        return [d / scale for d in diffs], first

    def _evaluator(self, closure: Callable[[], Tensor] | None) -> Callable[[tuple[int, float] | None], float]:
        """``evaluate(move)``: the loss at theta + coefficient * z(seed) for ``move = (seed,
        coefficient)`` (theta itself for None). In place the move is made relative to the
        previous one of the same seed (perturb, then the other way); in exact mode the hooks apply it."""
        last: dict[int, float] = {}  # seed -> coefficient theta is now perturbed by (in place)

        def evaluate(move: tuple[int, float] | None) -> float:
            if self.exact:
                if closure is None:
                    return 0.0
                if not self._attached:
                    raise FtlabError("MeZO in exact mode perturbs inside module forwards: "
                                     "call optimizer.attach(model) before step()")
                self._active = move
                try:
                    return float(closure())
                finally:
                    self._active = None
                    self._restore_all()
            if move is not None:
                seed, coef = move
                self._apply(seed, coef - last.get(seed, 0.0))
                last[seed] = coef
            return float(closure()) if closure is not None else 0.0
        return evaluate

    @property
    def _restore(self) -> float:
        """The z coefficient that undoes the last in-place perturbation of a seed (0 in exact
        mode: theta was never moved)."""
        if self.exact:
            return 0.0
        return -self.eps if self.one_sided else self.eps

    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Restore the last seed's perturbation fused with its update and the weight decay
        (one pass), then add the other seeds' updates."""
        n = len(seeds)
        self._apply(seeds[-1], self._restore, update=-lr * grads[-1] / n, decay_lr=lr)
        for seed, g in zip(seeds[:-1], grads[:-1]):
            self._apply(seed, -lr * g / n)

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
    def _perturb_hook(self, params: list[Tensor], index: dict[int, int], module: nn.Module, args: tuple) -> None:
        done = []
        if self._active is not None:
            seed, coef = self._active
            for p in params:
                if id(p) in self._saved:  # already perturbed by an enclosing forward
                    continue
                self._saved[id(p)] = p.detach().clone()
                flat = p.data.view(-1)
                for where, z, sign in self._z_chunks(seed, index[id(p)], p):
                    flat[where].add_(z, alpha=sign * coef)
                done.append(p)
        self._stack.append(done)

    @torch.no_grad()
    def _restore_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        for p in self._stack.pop() if self._stack else []:
            p.data.copy_(self._saved.pop(id(p)))

    @torch.no_grad()
    def _restore_all(self) -> None:
        """Copy back what a forward left perturbed (it raised before its hooks could)."""
        by_id = {id(p): p for _, p, _ in self._params()}
        for key, value in self._saved.items():
            by_id[key].data.copy_(value)
        self._saved.clear()
        self._stack.clear()

    # -- replay ------------------------------------------------------------------------------
    @torch.no_grad()
    def replay(self, record: ZOStep) -> None:
        """Redo a recorded step without forwards: the same parameter moves with the recorded
        projected gradients, so theta ends bit for bit where the original step left it."""
        self._estimate(record.seeds, None, record.grads)
        self._update(record.seeds, record.grads, record.lr)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """``values`` averaged over the ranks of the default process group, in one all-reduce
    (returned unchanged without torch.distributed or with one rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()
