"""Offloaded MeZO: train a model whose weights live in CPU memory, one decoder block at a time on
the compute device (the idea of ZO2, Wang et al. 2024, "ZO2: scalable zeroth-order fine-tuning
for extremely large language models with limited GPU memory").

Usage::

    check_host_memory(estimate_weight_bytes(config, torch.bfloat16))  # before loading the model
    model = load_model(..., device="cpu")                              # the weights on the CPU
    opt = OffloadedMeZO(model.parameters(), model=model, device="cuda", lr=1e-6, eps=1e-3)
    loss_pm = objectives.objective_fn("loss", model, tok, encoder, examples, opt.device, lockstep=True)
    for each step:  opt.step(loss_pm)         # returns L+, as MeZO.step does
    opt.flush()       # before evaluating (optional: forwards catch up themselves), saving, checkpointing

**Where the weights live.** The model's repeated decoder blocks (the ``nn.ModuleList`` holding the
most parameters, e.g. ``model.model.layers``; also inside a peft LoRA model) are *offloaded*: their
parameters and buffers stay in CPU memory (pinned when the device is CUDA), the master copy. A
block is copied to the device when it is called and dropped after its forward, so the device holds
one block (two with the perturbed copy, three with the prefetched next block) plus activations.
Every other parameter and buffer (embeddings, final norm, LM head, rotary tables) is *resident*
on the device, as ZO2 keeps them (``offload_non_blocks=True`` offloads those modules as well).

**Lockstep.** A step evaluates the model *once* on the batch concatenated with itself (2B rows):
the closure returns ``tensor([L_plus, L_minus])``, the losses of the two halves. Every "unit" (a
block, or another module holding trainable parameters) is intercepted at call time (its class is
swapped for a subclass overriding ``__call__``, so ``output_head``'s replaced ``forward`` and any
hooks still run): inside a step it splits every tensor argument of two or more dimensions whose
dim 0 is 2B (the row count of its first tensor argument) into halves (others, e.g. rotary tables
of batch 1 or 1-D ``cache_position``, go to both halves as they are), runs the first half with its
trainable parameters at ``theta + eps z`` and the second at ``theta - eps z`` (each made from an
unperturbed copy, as :class:`MeZO`'s exact mode does), and concatenates the outputs along dim 0.
So each block moves to the device once a step, not twice as two separate forwards would need.
Modules without trainable parameters run on all 2B rows (their weights are the same for both).
Lockstep forwards must not use a KV cache (``use_cache=False``; the loss does not).

**Updates.** The step is :meth:`MeZO.step` (:func:`ftlab.zo.mezo.mezo`: ``g = (L+ - L-) / (2
eps)``, float32-rounded, all-reduced over data-parallel ranks) and does *not* touch the weights:
the update ``theta <- theta (1 - lr wd) - lr g z`` is queued and applied to each parameter when
it is next brought to the device (on the device, by MeZO's own update, so the arithmetic is
MeZO's exact-mode update bit for bit), and the updated values are then written back to the CPU
master. The master is never perturbed, so the weights are exact in any precision. Parameters
not yet brought in since the last step lag behind: :meth:`OffloadedMeZO.flush` applies every
queued update (and waits for the copies) -- call it before reading weights outside the model's
forwards (saving, a checkpoint of tensors, comparing) and at the end of training.
:meth:`OffloadedMeZO.replay` queues a recorded step the same way, so a run resumed by replay
continues bit for bit.

Restrictions (one-line :class:`FtlabError` otherwise): one perturbation per step
(``n_perturbations=1``) and central differences (``one_sided=False``), as the lockstep pairs one
+eps with one -eps half; always exact (``exact=False`` is refused); full or LoRA fine-tuning
(parameters held by a module around the blocks, e.g. prefix tuning's key/value prefixes, are
refused: their forward encloses the blocks); no sharded (DTensor) parameters.

On CUDA the copies are ``non_blocking`` from pinned memory. With ``prefetch=True`` (the default)
the transfers run on two side streams (one per copy direction) while the main stream computes:
when block k is brought in, its write-back (after its update) and the upload of block k+1 are
queued there, so they overlap block k's two half forwards (the next step's block 0 is
prefetched after the last block; an upload waits for its masters' last write-back). The
device copies a pending write-back reads are kept until it is done and the CPU waits once more
than two are pending, so at most a few blocks are on the device at a time. ``prefetch=False``
does everything in order on the main stream (one block plus its perturbed copy on the device).
With ``device="cpu"`` the same code runs synchronously and a "move" is a copy into a distinct CPU
tensor, which is what the tests check against plain MeZO. ``moves`` counts the uploads per unit.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ftlab.distributed import blocks_of
from ftlab.errors import FtlabError
from ftlab.memory import available_host_bytes
from ftlab.zo.mezo import MeZO, ZOStep

GiB = 1 << 30


@dataclass(eq=False)
class Unit:
    """A module whose calls the optimizer intercepts."""

    name: str
    module: nn.Module
    block: int | None  # position in the block list (None: not a decoder block)
    offloaded: bool  # its tensors live on the CPU and are copied in per call
    moved: list[Tensor] = field(default_factory=list)  # params and buffers copied in (offloaded)
    trainable: list[nn.Parameter] = field(default_factory=list)  # perturbed and updated


class OffloadedMeZO(MeZO):
    """MeZO with CPU-resident decoder blocks run on ``device`` one at a time, in lockstep (see the
    module docstring). ``step(closure)``: ``closure()`` evaluates the model on the doubled batch
    and returns ``tensor([L_plus, L_minus])`` (:func:`ftlab.objectives.objective_fn` with
    ``lockstep=True`` builds it). Call :meth:`flush` before reading the weights.

    Args:
        params, lr, eps, weight_decay, distribution, generator, seed, chunk_size: as :class:`MeZO`.
        model: the model the parameters belong to (its weights may be anywhere; they are moved:
            blocks to CPU memory, the rest to ``device``).
        device: the compute device (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        n_perturbations, one_sided, exact: accepted for a common constructor; only 1, False and
            None/True are supported.
        offload_non_blocks: offload the modules outside the blocks too (embeddings, LM head):
            they are then copied in per call like blocks (less device memory, more traffic).
        prefetch: on CUDA, run the uploads (the next block's) and write-backs on two side
            streams, overlapping the current block's forwards (about 25% faster per step in
            benchmarks/results/offload_gpu.jsonl; one or two more blocks on the device).
        blocks: the decoder blocks (default: the ``nn.ModuleList`` holding the most parameters).
    """

    cache_views = False  # strided views are made on device copies that live for one call
    closure_returns = "tensor([L_plus, L_minus]) of the doubled batch (objective_fn(..., lockstep=True))"

    def __init__(self, params: Iterable, *, model: nn.Module, device: str | torch.device = "cuda",
                 lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, n_perturbations: int = 1,
                 one_sided: bool = False, distribution: str = "gaussian", generator: str = "strided",
                 seed: int = 0, chunk_size: int | None = None, exact: bool | None = None,
                 offload_non_blocks: bool = False, prefetch: bool = True,
                 blocks: Iterable[nn.Module] | None = None) -> None:
        if n_perturbations != 1 or one_sided:
            raise FtlabError(f"offloaded MeZO pairs one +eps and one -eps forward per step: it needs "
                             f"n_perturbations=1 and one_sided=false (got n_perturbations={n_perturbations}, "
                             f"one_sided={one_sided})")
        if exact is False:
            raise FtlabError("offloaded MeZO is always exact (the CPU master is never perturbed); "
                             "drop exact=false")
        extra = {} if chunk_size is None else {"chunk_size": chunk_size}
        self._scope: list[tuple[int, Tensor, float]] | None = None
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, n_perturbations=1,
                         one_sided=False, distribution=distribution, generator=generator, seed=seed,
                         exact=True, **extra)
        self.device = _compute_device(device)
        self.model = model
        self.prefetch = prefetch and self.device.type == "cuda"
        self._pin = self.device.type == "cuda"
        self._info: dict[int, tuple[int, float]] = {}  # id(param) -> (index, weight decay)
        for index, p, wd in super()._params():
            if type(p).__name__ == "DTensor":
                raise FtlabError("offloaded MeZO does not take sharded (FSDP/DTensor) parameters")
            self._info[id(p)] = (index, wd)
        self.units = _find_units(model, self._info, blocks, offload_non_blocks)
        self._master: dict[int, Tensor] = {}  # id(offloaded tensor) -> its CPU master
        self._place()
        # Queued updates (seed, g, lr); _done[id(p)] counts those applied to p, from _offset on.
        self._updates: list[tuple[int, float, float]] = []
        self._offset = 0
        self._done: dict[int, int] = {id(p): 0 for _, p, _ in super()._params()}
        self._active: int | None = None  # the seed of the running lockstep step
        self._sign: float | None = None  # the half an enclosing unit is running (+eps or -eps)
        self._in: set[int] = set()  # offloaded tensors now holding a device copy
        self._perturbing: set[int] = set()  # parameters now holding a perturbed copy
        self._prefetched: dict[int, tuple[Any, list[Tensor]]] = {}  # block -> (event, copies)
        # Uploads and write-backs on two side streams (the two copy directions run at once).
        self._up = torch.cuda.Stream(self.device) if self.prefetch else None
        self._down = torch.cuda.Stream(self.device) if self.prefetch else None
        self._written: dict[int, Any] = {}  # id(master) -> event of its last write-back (on _down)
        # Device copies the side stream still writes back from: (event, tensors), kept alive
        # until the event has passed (this also bounds how far the CPU runs ahead).
        self._keep: collections.deque[tuple[Any, list[Tensor]]] = collections.deque()
        self.moves: collections.Counter[str] = collections.Counter()  # uploads per unit name
        self._by_module = {id(u.module): u for u in self.units}
        self._classes: dict[type, type] = {}
        for unit in self.units:
            self._wrap(unit)

    # -- setup -------------------------------------------------------------------------------
    @torch.no_grad()
    def _place(self) -> None:
        """Offloaded tensors to (pinned) CPU memory, everything else of the model to the device."""
        offloaded: dict[int, Tensor] = {}
        for unit in self.units:
            if unit.offloaded:
                for t in unit.moved:
                    offloaded[id(t)] = t
        for t in offloaded.values():
            master = t.data.to("cpu")
            if self._pin and not master.is_pinned():
                master = master.pin_memory()
            t.data = master
            self._master[id(t)] = master
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) not in offloaded and t.device != self.device:
                t.data = t.data.to(self.device)

    def _wrap(self, unit: Unit) -> None:
        """Swap the unit's class for a subclass whose ``__call__`` goes through :meth:`_call`."""
        cls = type(unit.module)
        sub = self._classes.get(cls)
        if sub is None:
            opt = self

            def __call__(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                call = functools.partial(cls.__call__, module)
                found = opt._by_module.get(id(module))
                if found is None or found.module is not module:  # e.g. a deepcopy of the model
                    return call(*args, **kwargs)
                return opt._call(found, call, args, kwargs)
            sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__, "_ftlab_unwrapped": cls})
            self._classes[cls] = sub
        unit.module.__class__ = sub

    def close(self) -> None:
        """Apply the queued updates and give the modules their own classes back (the tensors
        stay where they are: blocks in CPU memory, the rest on the device)."""
        self.flush()
        for unit in self.units:
            original = getattr(type(unit.module), "_ftlab_unwrapped", None)
            if original is not None:
                unit.module.__class__ = original
        self._by_module = {}

    def attach(self, model: nn.Module) -> None:
        """Nothing to do: the model given to the constructor is already wired."""
        if model is not self.model:
            raise FtlabError("OffloadedMeZO is wired to the model given to its constructor; attach "
                             "was called with another model")

    def _params(self) -> list[tuple[int, Tensor, float]]:
        scope = getattr(self, "_scope", None)
        return scope if scope is not None else super()._params()

    def _device(self) -> torch.device:
        return self.device

    def z_spec(self) -> dict:
        """MeZO's: the directions, projected gradients and updates are plain MeZO's (exact
        mode), so either optimizer replays the other's trajectory log."""
        return {**super().z_spec(), "optimizer": MeZO.__name__}

    # -- moving tensors ----------------------------------------------------------------------
    def _upload(self, master: Tensor) -> Tensor:
        dev = torch.empty_like(master, device=self.device)
        dev.copy_(master, non_blocking=self._pin)
        return dev

    @torch.no_grad()
    def _catch_up(self, items: list[tuple[nn.Parameter, Tensor]]) -> None:
        """Apply the queued updates each parameter has not had yet to ``tensor`` (its device
        copy, or itself when resident), then write offloaded ones back to their CPU master."""
        total = self._offset + len(self._updates)
        behind = [(p, t) for p, t in items if self._done[id(p)] < total]
        if not behind:
            return
        for k in range(min(self._done[id(p)] for p, _ in behind), total):
            seed, g, lr = self._updates[k - self._offset]
            self._scope = [(self._info[id(p)][0], t, self._info[id(p)][1])
                           for p, t in behind if self._done[id(p)] <= k]
            try:  # plain MeZO's update (the one this optimizer queued), on these tensors only
                MeZO._update(self, [seed], [g], lr)
            finally:
                self._scope = None
        back = []
        for p, t in behind:
            self._done[id(p)] = total
            master = self._master.get(id(p))
            if master is not None and t is not master:
                back.append((master, t))
        self._write_back(back)

    def _write_back(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Copy updated device tensors to their CPU masters: on the side stream with prefetch (so
        the copy overlaps the forward; the device tensors are kept until it is done), else in order."""
        if not pairs:
            return
        if self._down is None:
            for master, dev in pairs:
                master.copy_(dev, non_blocking=self._pin)
            return
        self._down.wait_stream(torch.cuda.current_stream(self.device))  # after the update
        with torch.cuda.stream(self._down):
            for master, dev in pairs:
                master.copy_(dev, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._down)
        for master, _ in pairs:
            self._written[id(master)] = event
        self._keep.append((event, [dev for _, dev in pairs]))

    def _after_write_backs(self, stream: Any, masters: list[Tensor]) -> None:
        """Make ``stream`` wait for the last write-backs of ``masters`` before it reads them."""
        events = {id(e): e for e in (self._written.get(id(m)) for m in masters) if e is not None}
        for event in events.values():
            stream.wait_event(event)

    def _release(self, keep: int = 2) -> None:
        """Drop the write-back sources whose copies are done; wait for the oldest while more
        than ``keep`` are pending (the CPU then runs at most a few blocks ahead of the GPU)."""
        while self._keep and (len(self._keep) > keep or self._keep[0][0].query()):
            event, _ = self._keep.popleft()
            event.synchronize()

    def _bring_in(self, unit: Unit) -> list[tuple[Tensor, Tensor]]:
        """Copy the unit's offloaded tensors to the device and bring its trainable parameters up
        to date; returns ``(tensor, master)`` of what this call brought in (for :meth:`_bring_out`)."""
        opened: list[tuple[Tensor, Tensor]] = []
        copies: dict[int, Tensor] = {}
        if unit.offloaded:
            todo = [t for t in unit.moved if id(t) not in self._in]
            pre = self._prefetched.pop(unit.block, None) if unit.block is not None else None
            if self._down is not None:
                self._release()
                main = torch.cuda.current_stream(self.device)
                if pre is not None:
                    main.wait_event(pre[0])
                else:  # masters are written back on the side stream: read them after those copies
                    self._after_write_backs(main, [self._master[id(t)] for t in todo])
            if pre is not None:
                for t, dev in zip(unit.moved, pre[1]):
                    copies[id(t)] = dev
            for t in todo:
                copies.setdefault(id(t), self._upload(self._master[id(t)]))
            if todo:
                self.moves[unit.name] += 1
            self._catch_up([(p, copies.get(id(p), p.data)) for p in unit.trainable])
            for t in todo:
                opened.append((t, self._master[id(t)]))
                t.data = copies[id(t)]
                self._in.add(id(t))
        else:
            self._catch_up([(p, p.data) for p in unit.trainable])
        if self.prefetch and unit.block is not None:
            self._prefetch((unit.block + 1) % self._n_blocks)
        return opened

    def _bring_out(self, opened: list[tuple[Tensor, Tensor]]) -> None:
        for t, master in opened:
            t.data = master  # the device copy is freed (in stream order on CUDA)
            self._in.discard(id(t))

    @functools.cached_property
    def _n_blocks(self) -> int:
        return sum(u.block is not None for u in self.units)

    def _prefetch(self, block: int) -> None:
        """Upload block ``block`` on the upload stream (after its masters' last write-backs), so
        it overlaps the forward the main stream runs next."""
        unit = next(u for u in self.units if u.block == block)
        if block in self._prefetched or not unit.offloaded or any(id(t) in self._in for t in unit.moved):
            return
        main = torch.cuda.current_stream(self.device)
        assert self._up is not None
        # Allocated on the main stream (which uses and frees them), filled on the upload stream
        # once the main stream's earlier work (the memory's previous users) and the masters'
        # last write-backs are done.
        masters = [self._master[id(t)] for t in unit.moved]
        ready = [torch.empty_like(m, device=self.device) for m in masters]
        self._up.wait_stream(main)
        self._after_write_backs(self._up, masters)
        with torch.cuda.stream(self._up):
            for dev, master in zip(ready, masters):
                dev.copy_(master, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._up)
        self._prefetched[block] = (event, ready)

    def _drop_prefetched(self) -> None:
        """Wait for every copy in flight and forget the prefetched blocks."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prefetched.clear()
        self._keep.clear()
        self._written.clear()

    # -- the intercepted call ----------------------------------------------------------------
    @torch.no_grad()
    def _perturb(self, unit: Unit, coef: float) -> list[tuple[nn.Parameter, Tensor]]:
        """Point the unit's trainable parameters at ``theta + coef * z`` (fresh copies);
        returns ``(param, theta)`` to restore. Parameters an enclosing unit perturbed are left."""
        assert self._active is not None
        saved = []
        for p in unit.trainable:
            if id(p) in self._perturbing:
                continue
            base = p.data
            p.data = self.perturbed(self._active, self._info[id(p)][0], p, coef)
            self._perturbing.add(id(p))
            saved.append((p, base))
        return saved

    def _restore_params(self, saved: list[tuple[nn.Parameter, Tensor]]) -> None:
        for p, base in saved:
            p.data = base
            self._perturbing.discard(id(p))

    def _call(self, unit: Unit, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        opened = self._bring_in(unit)
        try:
            if self._active is None or not unit.trainable:
                return call(*args, **kwargs)
            if self._sign is not None:  # inside an enclosing unit's half: perturb alike, run once
                saved = self._perturb(unit, self._sign)
                try:
                    return call(*args, **kwargs)
                finally:
                    self._restore_params(saved)
            rows = _rows(args, kwargs, unit.name)
            halves = (_split((args, kwargs), rows, 0), _split((args, kwargs), rows, 1))
            outs = []
            for coef, (a, kw) in zip((self.eps, -self.eps), halves):
                saved = self._perturb(unit, coef)
                self._sign = coef
                try:
                    outs.append(call(*a, **kw))
                finally:
                    self._sign = None
                    self._restore_params(saved)
            return _concat(outs[0], outs[1], unit.name)
        finally:
            self._bring_out(opened)

    # -- the step: MeZO.step, with a lockstep loss and a queued update ---------------------
    def _evaluator(self, closure: Callable[[], Tensor] | None) -> Callable[[int | None, float], float]:
        """:func:`ftlab.zo.mezo.mezo`'s ``loss(seed, c)`` in lockstep: ``c = +eps`` runs the
        closure once on the doubled batch (each unit's halves at theta + eps z and theta - eps z)
        and returns L+; the ``-eps`` call that follows returns that forward's L-."""
        minus: dict[int | None, float] = {}

        def loss(seed: int | None, coef: float) -> float:
            if coef < 0:
                return minus.pop(seed)
            self._active = seed
            try:
                out = closure()  # type: ignore[misc]  (step passes one; replay makes no forwards)
            finally:
                self._active, self._sign = None, None
                self._in_step_cleanup()
            if not isinstance(out, Tensor) or out.numel() != 2:
                raise FtlabError(f"OffloadedMeZO.step needs a closure returning {self.closure_returns}; got "
                                 f"{type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
            flat = out.detach().flatten()
            minus[seed] = float(flat[1])
            return float(flat[0])
        return loss

    def _update(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Queue the step's update: it is applied to each parameter when the parameter is next
        brought to the device (or by :meth:`flush`)."""
        self._updates.append((seeds[0], grads[0], lr))
        self._trim()

    def _in_step_cleanup(self) -> None:
        """After a closure (which may have raised inside a unit): no unit left perturbed."""
        self._perturbing.clear()

    def _trim(self) -> None:
        """Forget the queued updates every parameter has had."""
        low = min(self._done.values(), default=self._offset + len(self._updates))
        if low > self._offset:
            del self._updates[:low - self._offset]
            self._offset = low

    @torch.no_grad()
    def replay(self, record: ZOStep) -> None:
        """Queue a recorded step's update, as :meth:`step` does (no forwards): after
        :meth:`flush` the weights equal ordinary MeZO's replay in exact mode, bit for bit."""
        if len(record.seeds) != 1:
            raise FtlabError(f"offloaded MeZO replays one perturbation per step; this record has "
                             f"{len(record.seeds)}")
        self._update(record.seeds, record.grads, record.lr)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every queued update to the weights (on the device, then written back to the CPU
        masters) and wait for the copies: after it, every parameter holds the trajectory's
        current weights. Call before saving or comparing weights, and at the end; and right
        before writing weights from outside (``load_trainable``, ``load_state_dict``: they copy
        into the CPU masters in place, which is only right when no update is queued)."""
        self._drop_prefetched()
        seen: set[int] = set()
        for unit in self.units:
            items = []
            total = self._offset + len(self._updates)
            for p in unit.trainable:
                if id(p) in seen or self._done[id(p)] >= total:
                    continue
                seen.add(id(p))
                master = self._master.get(id(p))
                items.append((p, p.data if master is None else self._upload(master)))
            self._catch_up(items)
            if self._down is not None:
                self._release()
        self._drop_prefetched()  # waits for the write-backs
        self._trim()


# -- splitting and joining the doubled batch -----------------------------------------------------
def _cache_type() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return None
    return Cache


def _rows(args: tuple, kwargs: dict, name: str) -> int:
    """The row count of the doubled batch: dim 0 of the unit's first tensor argument of two or
    more dimensions (hidden states, input ids)."""
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, Tensor) and x.dim() >= 2:
            if x.shape[0] % 2:
                raise FtlabError(f"offloaded MeZO: {name} got {x.shape[0]} rows inside a step; the closure "
                                 "must evaluate the doubled batch (objective_fn(..., lockstep=True))")
            return x.shape[0]
    raise FtlabError(f"offloaded MeZO: {name} was called without a batch tensor argument inside a step")


def _split(x: Any, rows: int, half: int) -> Any:
    """``x`` with every tensor of >= 2 dims and ``rows`` rows cut to its first or second half."""
    if isinstance(x, Tensor):
        if x.dim() >= 2 and x.shape[0] == rows:
            h = rows // 2
            return x[:h] if half == 0 else x[h:]
        return x
    if isinstance(x, tuple):
        items = [_split(v, rows, half) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [_split(v, rows, half) for v in x]
    if isinstance(x, dict):
        return {k: _split(v, rows, half) for k, v in x.items()}
    cache = _cache_type()
    if cache is not None and isinstance(x, cache):
        raise FtlabError("offloaded MeZO's lockstep forward cannot split a KV cache; the loss must run "
                         "with use_cache=False")
    return x


def _concat(a: Any, b: Any, name: str) -> Any:
    """The two halves' outputs joined along dim 0 (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(a, Tensor):
        if a.dim() == 0:
            raise FtlabError(f"offloaded MeZO: {name} returned a scalar inside a step; cannot join halves")
        return torch.cat([a, b], 0)
    if a is None:
        return None
    if isinstance(a, dict):  # ModelOutput included (an OrderedDict)
        joined = {k: _concat(a[k], b[k], name) for k in a.keys()}
        return type(a)(**joined) if hasattr(a, "to_tuple") else type(a)(joined)
    if isinstance(a, tuple):
        items = [_concat(x, y, name) for x, y in zip(a, b)]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    if isinstance(a, list):
        return [_concat(x, y, name) for x, y in zip(a, b)]
    if isinstance(a, (int, float, bool, str)) and a == b:
        return a
    raise FtlabError(f"offloaded MeZO: cannot join the two halves' outputs of {name} ({type(a).__name__}); "
                     "lockstep forwards must not use a KV cache (use_cache=False)")


# -- finding the units ----------------------------------------------------------------------------
def _own_params(module: nn.Module) -> list[nn.Parameter]:
    """A module's own parameters, with those of its ParameterList/Dict children (as MeZO.attach)."""
    holders = (nn.ParameterList, nn.ParameterDict)
    own = list(module.parameters(recurse=False))
    own += [p for c in module.children() if isinstance(c, holders) for p in c.parameters()]
    return own


def _find_units(model: nn.Module, trainable: dict[int, tuple[int, float]], blocks: Iterable[nn.Module] | None,
                offload_non_blocks: bool) -> list[Unit]:
    block_list = list(blocks_of(model) if blocks is None else blocks)
    paths = {id(m): n for n, m in model.named_modules()}
    names = {k: n or type(model).__name__ for k, n in paths.items()}
    inside: set[int] = set()
    units: list[Unit] = []
    for i, block in enumerate(block_list):
        if id(block) not in names:
            raise FtlabError("offloaded MeZO: a block passed as blocks= is not a module of the model")
        moved = list(block.parameters()) + list(block.buffers())
        units.append(Unit(names[id(block)], block, i, True, moved,
                          [p for p in block.parameters() if id(p) in trainable]))
        inside.update(id(m) for m in block.modules())
    first = paths.get(id(block_list[0]), "") if block_list else ""
    around = {id(m) for n, m in model.named_modules() if n == "" or first.startswith(n + ".")}
    holders = (nn.ParameterList, nn.ParameterDict)
    for module in model.modules():
        if id(module) in inside or isinstance(module, holders):
            continue
        own = _own_params(module)
        mine = [p for p in own if id(p) in trainable]
        if mine and id(module) in around:
            raise FtlabError(f"offloaded MeZO cannot train parameters held by {names[id(module)]} "
                             f"({type(module).__name__}), whose forward encloses the decoder blocks (e.g. "
                             "prefix tuning's prefixes); use full or LoRA fine-tuning")
        if mine or (offload_non_blocks and own and id(module) not in around):
            moved = own + list(module.buffers(recurse=False)) if offload_non_blocks else []
            units.append(Unit(names[id(module)], module, None, offload_non_blocks, moved, mine))
    covered = {id(p) for u in units for p in u.trainable}
    missing = [k for k in trainable if k not in covered]
    if missing:
        raise FtlabError(f"offloaded MeZO: {len(missing)} of the optimizer's parameters are not "
                         "parameters of the model it was given")
    return units


def _compute_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FtlabError("offloaded MeZO was asked to compute on CUDA, but no CUDA device is available; "
                             "use device=cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# -- host memory -----------------------------------------------------------------------------------
def check_host_memory(n_bytes: int, what: str = "the weights") -> None:
    """Raise a one-line FtlabError if the CPU cannot hold ``n_bytes`` (offload keeps the weights
    there); silent where MemAvailable cannot be read."""
    free = available_host_bytes()
    if free is not None and n_bytes > free:
        raise FtlabError(f"offload needs {n_bytes / GiB:.1f} GiB of CPU memory for {what} but only "
                         f"{free / GiB:.1f} GiB is available (MemAvailable in /proc/meminfo); free memory, "
                         "use a machine with more, a smaller model or a lower-precision dtype")


def estimate_weight_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the weights of a causal LM built from a transformers ``config`` in ``dtype``
    (instantiated on the meta device: nothing is allocated; tied weights count once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (itemsize if p.is_floating_point() else p.element_size())
               for p in model.parameters())
