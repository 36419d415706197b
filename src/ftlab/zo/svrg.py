"""MeZO-SVRG: MeZO with SVRG's control variate (Gautam et al., "Variance-reduced Zeroth-Order
Methods for Fine-Tuning Language Models", ICML 2024, Algorithm 1).

MeZO's projected gradient on a minibatch I mixes two noises: the random direction z and the
choice of I. SVRG cancels most of the second. Every q steps it takes an *anchor* x~ = x and a full-batch
SPSA estimate g~ there (the loss over a fixed set of many examples, its own seeds); in between,
each step takes the minibatch's projected gradient along ONE z both at x and at the anchor and
steps along their difference plus g~ (n seeds: averaged over them, the same z at both points)::

    every q steps (the first step, then q steps after the last anchor):      # "full-batch step"
        for s in seeds:  p_s = (F(x + eps z_s) - F(x - eps z_s)) / (2 eps)   # F: the full-batch loss
        x~ <- x;  g~ <- (1/n) sum_s p_s z_s
        x <- x - lr_full (g~ + wd x)                                         # lr_full = lr * full_lr_scale
    otherwise:                                                               # "SVRG step"
        for s in seeds:  p_s  = (f_I(x  + eps z_s) - f_I(x  - eps z_s)) / (2 eps)
                         p~_s = (f_I(x~ + eps z_s) - f_I(x~ - eps z_s)) / (2 eps)
        x <- x - lr ((1/n) sum_s (p_s - p~_s) z_s + g~ + wd x)

This is the paper's Algorithm 1: its full-batch steps take a step of their own along g~ (with
its larger step size eta_1; here ``lr * full_lr_scale``, ``zo.svrg_full_lr_scale``, 1 by default)
and do not use the step's minibatch (the closure ``step`` is given is not called; the loop's
batch order is unchanged); the SVRG steps use eta_2 = ``lr``. Both follow the lr schedule.
``one_sided`` uses forward differences at both points (n + 1 forwards at each).

**Why it helps.** ``E_z[(p_s - p~_s) z_s] = grad f_I(x) - grad f_I(x~)``, so the step is an
unbiased estimate of ``grad f(x) - grad f(x~) + g~``, i.e. of ``grad f(x)`` over the draws of
g~ too; the minibatch's own noise cancels between x and x~ (exactly for a quadratic with a
shared Hessian), and near the anchor the estimate's spread is that of g~ -- a full-batch one.
The price: g~ is an estimate along n directions only, and its error is applied on each of the q
steps; q must stay small (on tests/zo/test_svrg.py's quadratic q = 2 to 10 converge and q = 25
diverges at the lr that suits q = 5), or n larger.

**Cost.** ``forwards_per_step``: 4n minibatch forwards on an SVRG step (2n at x, 2n at x~;
one-sided 2n + 2); every q steps instead 2n forwards of the full batch (each as many batch
forwards as the full batch has micro-batches; :meth:`cost` says how many once known).
**Memory**: two float32 copies of the trainable parameters, the anchor x~ and g~
(``extra_bytes_per_entry = 8``, in ``optimizer.state[p]["anchor"]`` and ``["full_grad"]``):
fine for LoRA or a prefix, twice the weights for full fine-tuning. With bf16/fp16 parameters a
third, temporary copy of the anchor in their dtype exists while the model runs at the anchor.

**The full-batch objective** reaches the optimizer through a generic protocol: the class says
``needs_full_batch = True`` and whoever builds the run calls :meth:`MeZOSVRG.set_full_batch` once
with a factory of the full-batch closure (``ftlab train``: the same ``svrg_batch`` training
examples each time, micro-batched as the training batches are). A step without one is refused
in one line. Data parallelism is not implemented (refused by the strategy).

**Evaluating at the anchor** points every trainable parameter's ``.data`` at the anchor for the
2n forwards, then back: in place (float32) the anchor is perturbed and restored as theta is
(a rounding-level drift, as MeZO's own), in exact mode the hooks perturb copies of it.

**No replay.** The anchor and g~ are state the trajectory log does not hold: ``replayable =
False``, so a run is checkpointed as tensors (weights and ``state_dict``: anchor, g~ and the
steps since the anchor) and :meth:`MeZOSVRG.replay` refuses in one line.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.zo.directions import Piece, add_z, local_part
from ftlab.zo.mezo import MeZO, ZOStep, buffer_dtype, f32, loss_differences

SVRG_EVERY = 5  # q: steps from one full-batch estimate to the next (small: see the module docstring)
WHOLE_SPLIT_LIMIT = 1024  # svrg_batch unset: the whole training split, if it has at most this many examples

# make(size): the closure returning the mean loss over ``size`` fixed training examples at the
# current parameters, and the batch forwards one call of it runs
FullBatchFactory = Callable[[int], tuple[Callable[[], Tensor], int]]


class MeZOSVRG(MeZO):
    """MeZO-SVRG (see the module docstring).

    Args:
        params, lr, eps, weight_decay, n_perturbations, one_sided, distribution, generator, seed,
            chunk_size, exact: as :class:`ftlab.zo.MeZO`.
        svrg_every: q >= 1, the steps from one full-batch estimate to the next (q = 1: every
            step is a full-batch ZO-SGD step).
        svrg_batch: examples in the full-batch estimate (>= 1), or None for the whole training
            split (refused above ``WHOLE_SPLIT_LIMIT`` examples).
        full_lr_scale: eta_1 / eta_2, the full-batch steps' lr over the SVRG steps' (> 0).
    """

    replayable = False  # the anchor and g~ are not in the trajectory log
    extra_bytes_per_entry = 8  # the anchor and g~, float32
    buffers = ("anchor", "full_grad")
    needs_full_batch = True  # set_full_batch() before step(): the run builder gives the full-batch objective

    def __init__(self, params: Iterable, svrg_every: int = SVRG_EVERY, svrg_batch: int | None = None,
                 full_lr_scale: float = 1.0, **kwargs: Any) -> None:
        if svrg_every < 1 or (svrg_batch is not None and svrg_batch < 1) or not full_lr_scale > 0:
            raise FtlabError(f"MeZO-SVRG needs svrg_every >= 1, svrg_batch >= 1 (or None: the whole training "
                             f"split) and full_lr_scale > 0 (got {svrg_every}, {svrg_batch}, {full_lr_scale})")
        super().__init__(params, **kwargs)
        self.svrg_every, self.svrg_batch, self.full_lr_scale = svrg_every, svrg_batch, full_lr_scale
        self.anchor_age: int | None = None  # steps taken since the anchor was set (None: no anchor yet)
        self._full_batch: Callable[[], Tensor] | None = None
        self._full_batch_forwards: int | None = None  # batch forwards per full-batch closure call

    # -- the full-batch objective (the generic protocol) ------------------------------------------
    def set_full_batch(self, make: FullBatchFactory, available: int) -> None:
        """Take the full-batch objective: ``make(size)`` returns the closure over ``size`` fixed
        training examples (and the batch forwards a call runs); ``available``: the training
        examples there are. ``svrg_batch`` None asks for all of them."""
        size = self.svrg_batch if self.svrg_batch is not None else available
        if self.svrg_batch is None and available > WHOLE_SPLIT_LIMIT:
            raise FtlabError(f"optimizer=mezo-svrg without a full-batch size would evaluate the whole training split "
                             f"({available} examples) every zo.svrg_every steps: set zo.svrg_batch (e.g. 256)")
        if not 1 <= size <= available:
            raise FtlabError(f"zo.svrg_batch={size} exceeds the training split ({available} examples): "
                             f"lower it, or set it to null for the whole split")
        self._full_batch, self._full_batch_forwards = make(size)

    @property
    def forwards_per_step(self) -> int:
        """Closure calls of an SVRG step: MeZO's at x and again at the anchor (4n; one-sided
        2n + 2). Every ``svrg_every`` steps a step runs MeZO's number of full-batch forwards instead."""
        return 2 * super().forwards_per_step

    def cost(self) -> str:
        full = super().forwards_per_step
        m = self._full_batch_forwards
        batches = "" if m is None else f", {m} batch forward{'s' if m != 1 else ''} each"
        size = f"{self.svrg_batch} examples" if self.svrg_batch is not None else "the whole training split"
        return (f"{type(self).__name__}: {self.forwards_per_step} forwards a step (half at the anchor), and every "
                f"{self.svrg_every} steps instead {full} forwards of the full batch ({size}{batches}), "
                f"{self.extra_bytes_per_entry} extra bytes per trainable entry")

    def z_spec(self) -> dict:
        return {**super().z_spec(), "svrg_every": self.svrg_every, "svrg_batch": self.svrg_batch}

    # -- the step ---------------------------------------------------------------------------------
    def _algorithm(self, seeds: list[int], closure: Callable[[], Tensor], lr: float) -> ZOStep:
        """A full-batch step when the anchor is due (none yet, or ``svrg_every`` steps old), else
        an SVRG step on the closure's minibatch."""
        if self.anchor_age is None or self.anchor_age >= self.svrg_every:
            return self._full_batch_step(seeds, f32(lr * self.full_lr_scale))
        record = self._svrg_step(seeds, closure, lr)
        self.anchor_age += 1
        return record

    def _full_batch_step(self, seeds: list[int], lr: float) -> ZOStep:
        """x~ <- x, g~ <- the full-batch estimate, x <- x - lr (g~ + wd x); its loss is the
        full-batch L+. A non-finite estimate restores x and drops the anchor (the next step
        tries again)."""
        if self._full_batch is None:
            raise FtlabError(f"{type(self).__name__} needs a full-batch objective: call set_full_batch() before "
                             "step() (ftlab train does; this trainer does not provide one)")
        for _, p, _ in self._params():
            if local_part(p)[0].numel() != p.numel():
                raise FtlabError("MeZO-SVRG needs unsharded trainable parameters (its anchor is a whole copy)")
        diffs, plus = loss_differences(seeds, self._evaluator(self._full_batch), self.eps, self.one_sided)
        *diffs, plus = self._mean(diffs + [plus])
        grads = [f32(d / (self.eps if self.one_sided else 2 * self.eps)) for d in diffs]
        if self._restore:
            self._apply(seeds[-1], self._restore)  # x back where the step began (in place only)
        if not all(math.isfinite(x) for x in grads + [plus]):
            self.anchor_age = None
            return ZOStep(seeds, [0.0] * len(seeds), 0.0, math.nan)
        n = len(seeds)
        for index, p, wd in self._params():
            theta, anchor, full_grad = local_part(p)[0], self.buffer(p, "anchor"), self.buffer(p, "full_grad")
            anchor.copy_(theta)
            full_grad.zero_()
            for seed, g in zip(seeds, grads):
                for view, piece in self._buffer_pieces(full_grad, seed, index, p):
                    add_z(view, piece, g / n)
            if lr * wd:
                theta.mul_(1.0 - lr * wd)
            theta.add_(full_grad, alpha=-lr)
        self.anchor_age = 1
        return ZOStep(seeds, grads, lr, plus)

    def _svrg_step(self, seeds: list[int], closure: Callable[[], Tensor], lr: float) -> ZOStep:
        """x <- x - lr ((1/n) sum_s (p_s - p~_s) z_s + g~ + wd x) on the closure's minibatch; its
        loss is L+ at x. A non-finite loss restores x (lr logged 0), anchor and g~ unchanged."""
        diffs, plus = loss_differences(seeds, self._evaluator(closure), self.eps, self.one_sided)
        with self._at_anchor():  # x stays where its last perturbation left it
            anchor_diffs, _ = loss_differences(seeds, self._evaluator(closure), self.eps, self.one_sided)
            if self._restore:
                self._apply(seeds[-1], self._restore)  # the anchor back (in place only)
        n = len(seeds)
        *diffs, plus = self._mean(diffs + anchor_diffs + [plus])
        denominator = self.eps if self.one_sided else 2 * self.eps
        grads = [f32((d - a) / denominator) for d, a in zip(diffs[:n], diffs[n:])]
        if not all(math.isfinite(x) for x in grads + [plus]):
            grads, lr, plus = [0.0] * n, 0.0, math.nan
        self._update(seeds, grads, lr)  # MeZO's: x restored, decayed, moved along the z's
        if lr:
            for _, p, _ in self._params():
                local_part(p)[0].add_(self.buffer(p, "full_grad"), alpha=-lr)
        return ZOStep(seeds, grads, lr, plus)

    def replay(self, record: ZOStep) -> None:
        raise FtlabError("MeZO-SVRG steps cannot be replayed: they depend on the anchor and its full-batch "
                         "estimate, which the trajectory log does not hold")

    # -- the anchor and g~ ----------------------------------------------------------------------
    def buffer(self, p: Tensor, name: str) -> Tensor:
        """The anchor or g~ of parameter ``p`` (float32 at least), created at zeros."""
        state = self.state[p]
        if name not in state:
            state[name] = torch.zeros(p.shape, dtype=buffer_dtype(p), device=p.device)
        return state[name]

    def _buffer_pieces(self, buffer: Tensor, seed: int, index: int, p: Tensor) -> Iterator[tuple[Tensor, Piece]]:
        """``(view of the buffer, piece)`` per piece of parameter ``index``'s z."""
        flat = buffer.view(-1)
        for piece in self._z_chunks(seed, index, p):
            yield flat[piece.where].view(piece.z.shape), piece

    @contextlib.contextmanager
    def _at_anchor(self) -> Iterator[None]:
        """Every trainable parameter pointed at its anchor (the anchor itself when the dtypes
        agree, else a copy in the parameter's dtype), and back to x afterwards."""
        saved = [(p, p.data) for _, p, _ in self._params()]
        try:
            for p, data in saved:
                anchor = self.state[p]["anchor"]
                p.data = anchor if anchor.dtype == data.dtype else anchor.to(data.dtype)
            yield
        finally:
            for p, data in saved:
                p.data = data

    # -- checkpoints: the age of the anchor is state too --------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["anchor_age"] = self.anchor_age
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.anchor_age = state_dict.pop("anchor_age")
        super().load_state_dict(state_dict)
