"""Variants of MeZO that keep its seed trick, z chunks, estimate, exact mode and replay, and
change only how the projected gradients become an update. With ``d = (1/n) sum_k g_k z_k`` the
step's gradient estimate (n seeds), and MeZO's decoupled weight decay:

* :class:`ZOMomentum` -- ``m = beta m + d; theta -= lr m``. Extra memory: 4 bytes per
  trainable entry (one float32 buffer).
* :class:`ZOAdam` -- Adam(W) on ``d``, bias-corrected. Extra memory: 8 bytes per trainable
  entry (two float32 buffers).
* :class:`ZOSignSGD` -- ``theta -= (lr/n) sum_k sign(g_k) z_k``. No extra memory.
* :class:`SparseMeZO` -- MeZO on each tensor's smallest-magnitude entries only. Extra memory:
  1 byte per trainable entry in place (a bool mask, held during a step), none in exact mode.

Buffers are float32 (float64 for float64 parameters) whatever the parameter dtype, live in
``optimizer.state[p]`` (so ``state_dict`` holds them) and are created at the first update.
Temporaries are chunk-sized (a few chunks of z at once). The trajectory log is unchanged,
``(step, seed, g, lr)``: a replay re-runs the same updates from it, so it rebuilds the buffers
along with the weights, bit for bit. A skipped step (non-finite loss: logged with lr 0 and
zero projected gradients) only restores theta and leaves the buffers as they are.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.zo.directions import Piece, add_z, local_part, param_seed, signed_z
from ftlab.zo.mezo import MeZO, buffer_dtype

THRESHOLD_SAMPLE = 1 << 18  # entries of a tensor sampled to estimate its magnitude threshold


def is_skipped(grads: list[float], lr: float) -> bool:
    """Whether a step is one MeZO skipped for a non-finite loss (what it logs: lr 0, all g 0)."""
    return lr == 0.0 and not any(grads)


def estimate_direction(pieces: tuple[Piece, ...], coefs: list[float], dtype: torch.dtype) -> Tensor:
    """``sum_k coefs[k] * sign_k * z_k`` over one piece of every seed's z, in ``dtype``: the
    step's gradient estimate there (a new piece-sized tensor, at most TEMP_ELEMENTS entries)."""
    d = signed_z(pieces[0], coefs[0], dtype)
    for piece, c in zip(pieces[1:], coefs[1:]):
        add_z(d, piece, c)
    return d


class OnePassMeZO(MeZO):
    """MeZO whose whole update is one pass over each parameter, chunk by chunk: undo the last
    seed's in-place perturbation, decay, and apply :meth:`_chunk_step` to the gradient estimate
    formed from every seed's z at once (z of each seed generated once). Subclasses name their
    per-parameter ``buffers`` and define :meth:`_chunk_step`; the base is plain ZO-SGD."""

    buffers: tuple[str, ...] = ()  # see MeZO.buffers

    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        if is_skipped(grads, lr):
            if self._restore:
                self._apply(seeds[-1], self._restore)
            return
        coefs, restore = [g / len(seeds) for g in grads], self._restore
        for index, p, wd in self._params():
            state, flat, decay = self._begin_param(p), local_part(p)[0].detach().view(-1), lr * wd
            dtype = buffer_dtype(p)
            for pieces in zip(*(self._z_chunks(seed, index, p, bounded=True) for seed in seeds)):
                where, shape = pieces[0].where, pieces[0].z.shape
                mask = self._chunk_mask(index, p, where)  # read before the piece is written
                mask = None if mask is None else mask.view(shape)
                theta = flat[where].view(shape)
                if restore:
                    add_z(theta, pieces[-1], restore)
                if decay and mask is None:
                    theta.mul_(1.0 - decay)
                elif decay:  # not theta * where(mask, 1 - decay, 1): bf16 would round that factor to 1
                    theta.sub_(theta * mask, alpha=decay)
                buffers = {name: state[name].view(-1)[where].view(shape) for name in self.buffers}
                self._chunk_step(theta, estimate_direction(pieces, coefs, dtype), buffers, state, lr)

    def _begin_param(self, p: Tensor) -> dict[str, Any]:
        """The state of ``p`` for this update, its buffers created (zeros) at the first."""
        if not self.buffers:
            return {}  # stateless: do not fill optimizer.state with empty entries
        state = self.state[p]
        for name in self.buffers:
            if name not in state:
                local = local_part(p)[0]  # a sharded parameter keeps buffers for its shard only
                state[name] = torch.zeros(local.shape, dtype=buffer_dtype(p), device=local.device)
        return state

    def _chunk_mask(self, index: int, p: Tensor, where: slice) -> Tensor | None:
        """The entries of the chunk the step may change (None: all of them)."""
        return None

    def _chunk_step(self, theta: Tensor, d: Tensor, buffers: dict[str, Tensor], state: dict[str, Any],
                    lr: float) -> None:
        """Update one chunk of theta (restored and decayed) from the gradient estimate ``d``
        there; ``buffers`` are the matching chunks of the state tensors (views: write in place)."""
        theta.add_(d, alpha=-lr)


class ZOMomentum(OnePassMeZO):
    """ZO-SGD with heavy-ball momentum: ``m = momentum * m + d``, ``theta -= lr * m`` (torch's
    SGD momentum without dampening), with ``d`` the ZO gradient estimate ``(1/n) sum_k g_k z_k``.

    Extra memory: one buffer (``state[p]["momentum_buffer"]``) per trainable parameter, float32
    (float64 for float64 parameters): 4 bytes per trainable entry, twice the size of bf16
    weights, the size of float32 ones. The step memory of MeZO is otherwise kept.
    """

    extra_bytes_per_entry = 4

    buffers = ("momentum_buffer",)

    def __init__(self, params: Iterable, momentum: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 <= momentum < 1.0:
            raise FtlabError(f"ZO momentum must be in [0, 1) (got {momentum})")
        super().__init__(params, **kwargs)
        self.momentum = momentum

    def _chunk_step(self, theta: Tensor, d: Tensor, buffers: dict[str, Tensor], state: dict[str, Any],
                    lr: float) -> None:
        m = buffers["momentum_buffer"]
        m.mul_(self.momentum).add_(d)
        theta.add_(m, alpha=-lr)


class ZOAdam(OnePassMeZO):
    """Adam on the ZO gradient estimate ``d = (1/n) sum_k g_k z_k``, with bias correction and
    MeZO's decoupled weight decay (so AdamW): ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``,
    ``theta -= lr * m_hat / (sqrt(v_hat) + adam_eps)``. Each entry moves by about ``lr`` a step
    (the first step by exactly ``lr``, the sign of d): use an Adam-sized lr, not MeZO's.

    Extra memory: two buffers (``exp_avg``, ``exp_avg_sq``) per trainable parameter, float32
    (float64 for float64 parameters): 8 bytes per trainable entry, four times the size of bf16
    weights, twice that of float32 ones; plus the step count ``state[p]["step"]``.
    """

    extra_bytes_per_entry = 8

    buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 **kwargs: Any) -> None:
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas) or adam_eps <= 0:
            raise FtlabError(f"ZO-Adam needs two betas in [0, 1) and adam_eps > 0 "
                             f"(got betas={list(betas)}, adam_eps={adam_eps})")
        super().__init__(params, **kwargs)
        self.betas, self.adam_eps = (float(betas[0]), float(betas[1])), adam_eps

    def _begin_param(self, p: Tensor) -> dict[str, Any]:
        state = super()._begin_param(p)
        state["step"] = state.get("step", 0) + 1  # per parameter, as torch's Adam counts
        return state

    def _chunk_step(self, theta: Tensor, d: Tensor, buffers: dict[str, Tensor], state: dict[str, Any],
                    lr: float) -> None:
        (b1, b2), t = self.betas, state["step"]
        m, v = buffers["exp_avg"], buffers["exp_avg_sq"]
        m.mul_(b1).add_(d, alpha=1 - b1)
        v.mul_(b2).addcmul_(d, d, value=1 - b2)
        denom = d.copy_(v).sqrt_().div_(math.sqrt(1 - b2 ** t)).add_(self.adam_eps)  # d is spent: reuse it
        theta.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class ZOSignSGD(MeZO):
    """Sign-SGD on the projected gradient: ``theta -= (lr/n) sum_k sign(g_k) z_k``.

    This is the sign of the *scalar* projected gradient g, not ZO-signSGD of Liu et al. (2019),
    which takes the coordinate-wise sign of the gradient estimate (``sign(g z)``, every entry
    moving by exactly lr). Here the step keeps z's magnitudes and drops only g's: it is
    invariant to the scale of the loss and immune to outlier loss differences, and its size is
    ``lr * |z|`` whatever the loss. No extra memory; MeZO's fused restore + update is kept.
    """

    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        super()._update(seeds, [math.copysign(1.0, g) if g else 0.0 for g in grads], lr)


class SparseMeZO(OnePassMeZO):
    """Sparse MeZO (Liu et al., 2024): perturb and update only each parameter's
    smallest-magnitude entries, those with ``|theta| <= h``, where the per-tensor threshold h is
    the ``sparsity`` quantile of ``|theta|`` (0.75: the 75% smallest entries are trained, the
    largest 25% frozen for the step). Weight decay, too, touches only those entries.

    The mask is a function of theta at the start of the step, and the same for the +eps and
    -eps forwards, the restores and the update. h is recomputed at every step from the
    unperturbed weights (exactly with ``kthvalue`` for tensors of up to ``threshold_sample``
    entries; for larger ones from that many entries at positions drawn from a fixed seed per
    parameter: deterministic, so a replay finds the same h, and off the exact quantile by
    about ``0.5/sqrt(threshold_sample)``, 0.001 by default). Where the mask comes from:

    * **exact mode**: theta never moves during a step, so the mask of a chunk is recomputed
      from theta itself wherever it is needed (``|theta| <= h``, read before the chunk is
      written): no mask is stored, only one threshold per tensor. This is also why the update
      is a single pass (:class:`OnePassMeZO`): a second pass would see updated weights.
    * **in place**: a perturbed ``theta + eps z`` cannot tell which entries were below h (an
      entry may cross it, and the moves round), so the mask is computed once at the start of
      the step into a bool tensor (1 byte per trainable entry, 25% of float32 weights) that is
      freed after the update.

    ``step`` and ``replay`` both compute the mask when they begin (:meth:`_begin_step`), from
    the same weights, so a replay is bitwise.
    """

    extra_bytes_per_entry = 1

    cache_views = False  # its pieces are masked copies of z: never keep them

    def __init__(self, params: Iterable, sparsity: float = 0.75, threshold_sample: int = THRESHOLD_SAMPLE,
                 **kwargs: Any) -> None:
        if not 0.0 < sparsity <= 1.0 or threshold_sample < 1:
            raise FtlabError(f"sparse MeZO needs sparsity in (0, 1] (the fraction of each tensor's "
                             f"smallest-magnitude entries trained) and threshold_sample >= 1 "
                             f"(got sparsity={sparsity}, threshold_sample={threshold_sample})")
        super().__init__(params, **kwargs)
        self.sparsity, self.threshold_sample = sparsity, threshold_sample
        self._thresholds: dict[int, float] = {}  # parameter index -> h, for the current step
        self._masks: dict[int, Tensor] = {}  # parameter index -> flat bool mask (in place only)

    def _begin_step(self) -> None:
        super()._begin_step()
        self._prepare_masks()  # theta unperturbed

    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        if not self._thresholds:  # _update run alone, without a step (exact mode)
            self._prepare_masks()
        super()._update(seeds, grads, lr)
        self._thresholds.clear()
        self._masks.clear()

    @torch.no_grad()
    def _prepare_masks(self) -> None:
        """Thresholds (and, in place, masks) from the current, unperturbed weights."""
        self._thresholds.clear()
        self._masks.clear()
        for index, p, _ in self._params():
            h = self._threshold(index, p)
            self._thresholds[index] = h
            if not self.exact:
                flat, mask = p.detach().view(-1), torch.empty(p.numel(), dtype=torch.bool, device=p.device)
                for start in range(0, p.numel(), self.chunk_size):  # chunked: bounded temporaries
                    where = slice(start, start + self.chunk_size)
                    torch.le(flat[where].abs(), h, out=mask[where])
                self._masks[index] = mask

    def _threshold(self, index: int, p: Tensor) -> float:
        """h: the k-th smallest |theta| of the tensor (or of a fixed random sample of it), with
        k the ``sparsity`` fraction of the entries."""
        flat = p.detach().view(-1)
        if flat.numel() == 0:
            return 0.0
        if flat.numel() > self.threshold_sample:
            gen = torch.Generator().manual_seed(param_seed(0, index))
            positions = torch.randint(flat.numel(), (self.threshold_sample,), generator=gen)
            flat = flat[positions.to(flat.device)]
        k = min(flat.numel(), max(1, round(self.sparsity * flat.numel())))
        return float(flat.abs().to(buffer_dtype(p)).kthvalue(k).values)  # exact: h is one of the |theta|

    def _chunk_mask(self, index: int, p: Tensor, where: slice) -> Tensor:
        if not self.exact:
            return self._masks[index][where]
        # Exact mode: theta is unperturbed whenever a chunk of z is asked for (hooks perturb a
        # chunk after reading it, updates write it after), so the mask is recomputed from it.
        return p.detach().view(-1)[where].abs() <= self._thresholds[index]

    def _z_chunks(self, step_seed: int, index: int, p: Tensor, bounded: bool = False) -> Iterable[Piece]:
        """MeZO's pieces of z with the frozen entries zeroed: every perturbation, restore and
        update (all made from these pieces) then leaves them exactly as they are. (Always in
        bounded pieces: the masked z is a temporary.)"""
        for where, z, sign in super()._z_chunks(step_seed, index, p, bounded=True):
            yield Piece(where, z * self._chunk_mask(index, p, where).view(z.shape), sign)
