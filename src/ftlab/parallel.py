"""Parallelism strategies: how one run is spread over processes and devices, chosen once from
the config by :func:`build_parallelism` so the training loop (:mod:`ftlab.train`) never asks.

==================  =======================================================================
strategy            what it does
==================  =======================================================================
``Single``          one process, zeroth order: the module itself, no communication
``ZODataParallel``  zeroth order over ``torchrun`` ranks: every rank the whole model and its
                    shard of the batch; MeZO all-reduces one scalar per perturbation
``Offload``         zeroth order with the weights in CPU memory, blocks brought to the device
                    one at a time (:mod:`ftlab.zo.offload`); forwards in lockstep
``ShardedZO``       zeroth order on FSDP2 shards (each rank perturbs and updates its own)
``DDP``             first order, synchronous: PyTorch's DistributedDataParallel (one process:
                    the module itself), the loss averaged over ranks, rounds counted
``LocalSGD``        first order, Local SGD (:mod:`ftlab.local_sgd`): weights averaged every H
                    steps; each rank keeps its own weights and optimizer state in between
``FSDP``            first order on FSDP2 shards (gradients reduce-scattered)
==================  =======================================================================

A strategy answers, for the loop: where the model is loaded (:meth:`Single.load_model`), how
it is placed (:meth:`Single.prepare`, before the optimizer sees the parameters), the module
the training forwards run through (:meth:`Single.setup`), a step's dropout seed, its logged
loss and log fields, how dev and test sets are evaluated over the ranks (split and gathered,
or everywhere under FSDP), whether saving tensors is a collective, the module saved at the
end, and which checkpointer keeps the run resumable (:mod:`ftlab.checkpoint`).

Only rank 0 (``main``) writes the run folder; every rank gets the same metrics.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ftlab.checkpoint import (
    Checkpointer,
    PerRankCheckpointer,
    ShardedCheckpointer,
    TensorCheckpointer,
    TrainState,
    TrajectoryCheckpointer,
    copy_trainable_into,
    save_trainable,
    trainable_state,
)
from ftlab.config import TrainConfig
from ftlab.distributed import all_gather, init_from_env, rank_device, shard, shard_model, split_evenly
from ftlab.errors import FtlabError
from ftlab.evaluate import EvalResult, evaluate, task_metrics
from ftlab.models import load_model, prepare_model
from ftlab.optim import is_zeroth_order
from ftlab.rundir import RunDir
from ftlab.tasks import TaskSpec


class Single:
    """One process, zeroth order: the module itself, nothing communicated. The base of every
    strategy: each method is what one process does, and subclasses change only what differs."""

    evaluates_everywhere = False  # FSDP: every rank evaluates everything (its forwards need every rank)
    collective_saves = False  # FSDP: every rank takes part in gathering the tensors it saves
    lockstep = False  # offload: the +eps and -eps forwards run in one pass

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.main = rank == 0  # the only process that writes to the run folder
        self.device = rank_device(cfg.device)
        self.autocast = bf16_autocast(self.device) if cfg.autocast else None  # refused where bf16 is not
        self.module: nn.Module | None = None  # the trained module (set by setup)
        self.forward_module: nn.Module | None = None  # what the training forwards run through

    # -- set-up -----------------------------------------------------------------------------
    def load_model(self) -> tuple[nn.Module, Any]:
        """The base model and tokenizer of ``cfg.model`` (``device_map`` places the model itself)."""
        return load_model(self.cfg.model, dtype=self.cfg.dtype, device=self.load_device,
                          device_map=self.cfg.device_map)

    @property
    def load_device(self) -> str:
        return self.device

    def prepare(self, module: nn.Module) -> None:
        """Place the prepared module before the optimizer is built over its parameters."""

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The module the training forwards run through (after :meth:`prepare` and the optimizer)."""
        self.module = self.forward_module = module

    def checkpointer(self, run: RunDir, optimizer: torch.optim.Optimizer) -> Checkpointer:
        """The trajectory log, for a zeroth-order optimizer whose steps replay from their records;
        tensors and optimizer state for one whose state does not (``replayable = False``)."""
        if getattr(optimizer, "replayable", True):
            return TrajectoryCheckpointer(run, self.main, self.cfg, optimizer)
        return TensorCheckpointer(run, self.main)

    def resume(self, state: TrainState, lr: float) -> None:
        """Continue from ``state`` (the counters a checkpoint restored); ``lr``: the next step's."""

    # -- a step -----------------------------------------------------------------------------
    def shard(self, batch: list[int]) -> list[int]:
        """This rank's equal part of the step's global batch."""
        return shard(batch, self.rank, self.world)

    def step_seed(self, seed: int) -> int:
        """The dropout seed of a step (zeroth order: the same on every rank)."""
        return seed

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Entered around every micro-batch's backward but the last (first order)."""
        return contextlib.nullcontext()

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The step's loss for the log."""
        return float(loss.detach())

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Count the step just taken; returns the fields it adds to the step's log record."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """The strategy's counters, saved with the loop's (None: it keeps none)."""
        return None

    # -- evaluation and saving ------------------------------------------------------------------
    def averaged(self) -> contextlib.AbstractContextManager:
        """A context in which the module holds the weights to evaluate (Local SGD: the ranks' average)."""
        return contextlib.nullcontext()

    def evaluate(self, module: nn.Module, tokenizer: Any, spec: TaskSpec, examples: list, *,
                 progress: bool = False, desc: str = "eval") -> EvalResult:
        """:func:`ftlab.evaluate.evaluate` of ``examples``, split over the ranks and gathered: each
        rank evaluates its contiguous part, the predictions are gathered in order and the metrics
        computed over all of them (the same numbers as one process, up to the rounding of the
        summed losses and of the batches' padding)."""
        kw = dict(batch_size=self.cfg.eval_batch_size, max_length=self.cfg.data.max_length, desc=desc)
        if self.world == 1 or self.evaluates_everywhere:
            return evaluate(module, tokenizer, spec, examples, progress=progress, **kw)
        part = split_evenly(list(examples), self.rank, self.world)
        mine = evaluate(module, tokenizer, spec, part, progress=progress, **kw) if part else None
        gathered = all_gather(([], 0.0) if mine is None else
                              (mine.predictions, mine.metrics.get("loss", 0.0) * len(part)))
        predictions = [p for preds, _ in gathered for p in preds]
        metrics = task_metrics(spec, examples, predictions)
        if spec.kind == "classification":
            metrics["loss"] = sum(loss_sum for _, loss_sum in gathered) / len(examples)
        return EvalResult(metrics, predictions)

    def save_trainable(self, module: nn.Module, path: Path) -> None:
        """Write the trainable tensors (rank 0 writes; sharded: every rank helps gather them)."""
        if self.main or self.collective_saves:
            save_trainable(module, path, write=self.main)

    def saved_module(self, module: nn.Module) -> nn.Module | None:
        """The module to save at the end (None on ranks that do not write)."""
        return module


class ZODataParallel(Single):
    """Zeroth order over ``torchrun`` ranks: every rank holds the whole model, draws the same
    seeds and evaluates its shard of the batch; the optimizer averages the loss differences over
    ranks with one scalar all-reduce (see :class:`ftlab.zo.MeZO`), so the ranks stay identical."""

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from ftlab.zo.mezo import MeZO

        # The ranks' loss differences are averaged inside MeZO's step (ftlab.zo.mezo.mezo; its variants inherit it).
        if not isinstance(optimizer, MeZO):
            raise FtlabError(f"data-parallel training is not implemented for optimizer={self.cfg.optimizer}; "
                             f"run it in a single process")
        if getattr(optimizer, "needs_full_batch", False):  # MeZO-SVRG: its full-batch objective is one process's
            raise FtlabError(f"optimizer={self.cfg.optimizer} is not implemented under data parallelism or fsdp (its "
                             f"full-batch estimate is evaluated in one process); run it in a single process")
        super().setup(module, optimizer)


class Offload(Single):
    """Offloaded MeZO (:mod:`ftlab.zo.offload`): the weights stay in CPU memory (checked to fit
    before loading) and the decoder blocks visit the device one at a time, the +eps and -eps
    forwards in lockstep."""

    lockstep = True

    def load_model(self) -> tuple[nn.Module, Any]:
        _check_offload_memory(self.cfg)
        return super().load_model()

    @property
    def load_device(self) -> str:
        return "cpu"


class DDP(Single):
    """First order, synchronous data parallelism: PyTorch's DistributedDataParallel over the
    ranks (in one process, the module itself). The logged loss is the ranks' mean, and
    communication rounds (one gradient all-reduce per step) are counted."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> None:
        super().__init__(cfg, rank, world)
        self.sync_rounds = 0  # synchronous steps done

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = module
        self.forward_module = _ddp(module, self.device) if self.world > 1 else module

    def checkpointer(self, run: RunDir, optimizer: torch.optim.Optimizer) -> Checkpointer:
        return TensorCheckpointer(run, self.main)

    def resume(self, state: TrainState, lr: float) -> None:
        self.sync_rounds = state.step  # a checkpoint without counters: every step was synchronous
        if state.parallel:
            self.sync_rounds = state.parallel["sync_rounds"]

    def step_seed(self, seed: int) -> int:
        return seed * self.world + self.rank  # each rank holds other examples: other dropout masks

    def no_sync(self) -> contextlib.AbstractContextManager:
        if isinstance(self.forward_module, nn.parallel.DistributedDataParallel):
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The mean of the ranks' losses (the global batch's mean loss: the shards are equal)."""
        loss = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return float(loss)

    @property
    def rounds(self) -> int:
        """Communication rounds so far (0 in one process)."""
        return self.sync_rounds if self.world > 1 else 0

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        self.sync_rounds += 1
        return {"comm_rounds": self.rounds} if self.world > 1 else {}

    def state_dict(self) -> dict[str, Any] | None:
        return {"sync_rounds": self.sync_rounds, "local_sgd": None}


class LocalSGD(DDP):
    """First order, Local SGD: PyTorch's post-local SGD hook on the DDP module (gradients
    all-reduced until ``local_sgd.switch_step``, not after) and a
    :class:`ftlab.local_sgd.LocalSGDAverager` averaging the weights at the end of each round of H
    local steps. In between the ranks' weights and optimizer states differ: a checkpoint holds
    every rank's, and dev evaluations see the ranks' average. Rounds: one per synchronous step
    and one per average."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> None:
        from ftlab.local_sgd import LocalSGDAverager

        super().__init__(cfg, rank, world)
        self.averager = LocalSGDAverager(cfg.local_sgd, cfg.steps, world=world)
        self.hook = None

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from ftlab.local_sgd import register_post_local_hook

        super().setup(module, optimizer)
        if self.world > 1:
            self.hook = register_post_local_hook(self.forward_module, self.cfg.local_sgd, 0)

    def checkpointer(self, run: RunDir, optimizer: torch.optim.Optimizer) -> Checkpointer:
        return PerRankCheckpointer(run, self.main, self.rank) if self.world > 1 else TensorCheckpointer(run, self.main)

    def resume(self, state: TrainState, lr: float) -> None:
        super().resume(state, lr)
        if self.hook is not None:
            self.hook.iter = min(state.step, self.cfg.local_sgd.switch_step)  # the hook continues its count
        if state.parallel and state.parallel.get("local_sgd"):
            self.averager.load_state_dict(state.parallel["local_sgd"])
        if self.averager.step == 0:
            self.averager.start(lr)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def after_step(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        self.averager.after_step(self.params, optimizer.param_groups[0]["lr"])  # averages at a round's end
        return {"comm_rounds": self.averager.rounds, "H": self.averager.period}

    def state_dict(self) -> dict[str, Any] | None:
        return {"sync_rounds": self.sync_rounds, "local_sgd": self.averager.state_dict()}

    @contextlib.contextmanager
    def averaged(self):
        """The ranks' average weights, for evaluating in the middle of a round (each rank's own
        come back after). One all-reduce, not counted as a round; a no-op when the ranks agree."""
        from ftlab.local_sgd import restore, snapshot

        if self.world == 1 or self.averager.synced:
            yield
            return
        saved = snapshot(self.params)
        self.averager.average_parameters(self.params)
        try:
            yield
        finally:
            restore(self.params, saved)


class _Sharded:
    """FSDP2 (mixed into a strategy): loaded on the CPU and sharded onto the device, every
    parameter a ``DTensor`` of which each rank holds 1/world; every rank evaluates everything and
    helps gather what is saved; the model saved at the end is an unsharded copy."""

    evaluates_everywhere = True
    collective_saves = True
    load_device = "cpu"

    def prepare(self, module: nn.Module) -> None:
        shard_model(module, self.device)  # parameters become DTensor shards, before the optimizer sees them

    def saved_module(self, module: nn.Module) -> nn.Module | None:
        """The trainable tensors gathered from every rank (all call this) into a fresh, unsharded
        copy of the base model built on rank 0's CPU (None on the other ranks). The frozen
        weights are the base model's own, as in the run."""
        cfg = self.cfg
        state = trainable_state(module)
        if not self.main:
            return None
        base, _ = load_model(cfg.model, dtype=cfg.dtype, device="cpu")
        plain = prepare_model(base, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=cfg.seed_of("init"))
        copy_trainable_into(plain, state)
        return plain


class ShardedZO(_Sharded, ZODataParallel):
    """Zeroth order on FSDP2 shards: each rank perturbs and updates its own shard, z indexed by
    the global element (:mod:`ftlab.zo.directions`); the trajectory log is the checkpoint."""

    def prepare(self, module: nn.Module) -> None:
        _check_shardable(self.cfg)
        super().prepare(module)


class FSDP(_Sharded, DDP):
    """First order on FSDP2 shards: gradients reduce-scattered every step (micro-batches
    accumulate without it); checkpoints hold whole tensors and the whole optimizer state."""

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = self.forward_module = module

    def checkpointer(self, run: RunDir, optimizer: torch.optim.Optimizer) -> Checkpointer:
        return ShardedCheckpointer(run, self.main)

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def build_parallelism(cfg: TrainConfig) -> Single:
    """The strategy ``cfg`` asks for, after joining the process group ``torchrun`` set up (a
    plain process: one rank). Fails fast on a batch the ranks, then the micro-batches, cannot split."""
    rank, world = init_from_env(cfg.device)
    zeroth_order = is_zeroth_order(cfg.optimizer)
    if cfg.offload:
        strategy = Offload
    elif cfg.fsdp:
        strategy = ShardedZO if zeroth_order else FSDP
    elif zeroth_order:
        strategy = ZODataParallel if world > 1 else Single
    else:
        strategy = DDP if cfg.local_sgd.period is None else LocalSGD
    parallel = strategy(cfg, rank, world)
    micro_batches(parallel.shard(list(range(cfg.batch_size))), cfg.grad_accum)
    return parallel


def micro_batches(items: list[Any], k: int) -> list[list[Any]]:
    """``items`` cut into ``k`` consecutive equal micro-batches (``k`` divides its length)."""
    if len(items) % k:
        raise FtlabError(f"a batch of {len(items)} examples per process cannot be cut into grad_accum={k} "
                         f"equal micro-batches; make batch_size a multiple of grad_accum x processes")
    size = len(items) // k
    return [items[i * size:(i + 1) * size] for i in range(k)]


def bf16_autocast(device: str) -> Callable[[], Any]:
    """A factory of bf16 autocast contexts for ``device``, after checking that it runs bf16
    (one-line error otherwise: a GPU older than Ampere, or a device type without autocast)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise FtlabError(f"autocast=true on device={device}, but CUDA is not available; use device=cpu")
        if not torch.cuda.is_bf16_supported():
            raise FtlabError(f"autocast=true needs bf16, which {torch.cuda.get_device_name()} does not support "
                             f"(compute capability 8.0+ needed); set autocast=false to train in float32")
    elif not torch.amp.is_autocast_available(kind):
        raise FtlabError(f"autocast=true: device type {kind!r} has no bf16 autocast; set autocast=false")

    def autocast() -> torch.autocast:
        return torch.autocast(device_type=kind, dtype=torch.bfloat16)
    return autocast


def _ddp(module: nn.Module, device: str) -> nn.Module:
    """``module`` in PyTorch's DistributedDataParallel, exposing the wrapped model's output
    embedding, so :func:`ftlab.models.head.output_head` replaces the same head through the
    wrapper as it does on the bare model (same numbers)."""
    from torch.nn.parallel import DistributedDataParallel

    class WithHead(DistributedDataParallel):
        def get_output_embeddings(self) -> nn.Module | None:
            get = getattr(self.module, "get_output_embeddings", None)
            return get() if callable(get) else None

    cuda = device.startswith("cuda")
    return WithHead(module, device_ids=[torch.device(device).index or 0] if cuda else None, broadcast_buffers=False)


def _check_shardable(cfg: TrainConfig) -> None:
    """What sharded MeZO supports: in-place perturbation (float32 master weights; exact mode
    perturbs inside module forwards, which FSDP runs on gathered copies) and per-tensor rules
    that do not need the whole tensor (sparse MeZO's magnitude quantile does). First-order
    training shards with no such limits (FSDP2 reduce-scatters the gradients)."""
    if cfg.optimizer == "sparse-mezo":
        raise FtlabError("fsdp=true: sparse-mezo's per-tensor magnitude threshold needs whole tensors; "
                         "use mezo, zo-sign, zo-momentum or zo-adam")
    if cfg.zo.exact or (cfg.zo.exact is None and cfg.dtype in ("bfloat16", "float16")):
        raise FtlabError(f"fsdp=true perturbs the float32 shards in place; exact mode (dtype={cfg.dtype}, "
                         f"zo.exact={cfg.zo.exact}) is not implemented under FSDP: use dtype=float32")
    if cfg.zo.generator != "strided":
        raise FtlabError(f"fsdp=true needs zo.generator=strided (z indexed by the global element, so each "
                         f"rank makes its shard's part); got {cfg.zo.generator!r}")


def _check_offload_memory(cfg: TrainConfig) -> None:
    """Refuse offload before loading when the CPU cannot hold the weights."""
    from transformers import AutoConfig

    from ftlab.models.loading import EMBEDDED_MODELS, converted_folder, parse_dtype
    from ftlab.zo.offload import check_host_memory, estimate_weight_bytes

    folder = str(converted_folder(cfg.model)) if cfg.model in EMBEDDED_MODELS else cfg.model
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises OSError, ValueError, ...
        raise FtlabError(f"cannot read the config of model {cfg.model!r}: {str(e).splitlines()[0][:200]}") from e
    check_host_memory(estimate_weight_bytes(config, parse_dtype(cfg.dtype)), f"the weights of {cfg.model}")


