"""The one training loop: first-order (AdamW/SGD) today, and any optimizer whose
``step(closure)`` takes a closure returning the loss (zeroth-order optimizers set
``zeroth_order = True`` and get a closure that only runs forwards, without gradients).

The run folder's layout is :class:`ftlab.rundir.RunDir`'s; optimizers, their parameter groups and
the lr schedule are :mod:`ftlab.optim`'s.

Data parallel (launched with ``torchrun``; see :mod:`ftlab.distributed`): ``batch_size`` is the
global batch, each rank trains on its equal slice of it, and only rank 0 writes the folder.
Zeroth-order optimizers all-reduce one scalar per perturbation; first-order ones run through
PyTorch's DistributedDataParallel (gradients all-reduced every step) or Local SGD
(:mod:`ftlab.local_sgd`: weights averaged every H steps). Dev and test evaluations are split
over the ranks and gathered, so every rank gets the same metrics and keeps the same best step
(with ``fsdp``, whose forwards need every rank, each rank evaluates the whole split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ftlab import objectives
from ftlab.checkpoint import (
    load_checkpoint,
    load_extra,
    load_trainable,
    save_checkpoint,
    save_trainable,
    trainable_state,
)
from ftlab.config import TrainConfig, from_dict, to_dict
from ftlab.distributed import (
    DataParallel,
    all_gather,
    barrier,
    gather_to_main,
    init_from_env,
    rank_device,
    shard,
    shard_model,
    split_evenly,
)
from ftlab.errors import FtlabError, damaged
from ftlab.evaluate import EvalResult, _metrics, evaluate, model_device
from ftlab.io import atomic_write_json, atomic_write_text, recover_dir
from ftlab.models import load_model, prepare_model, save_trained, trainable_parameters
from ftlab.objectives import Encoder
from ftlab.optim import build_optimizer, is_zeroth_order, lr_factor, no_decay, param_groups  # noqa: F401
from ftlab.rundir import RunDir, read_written_json
from ftlab.runs import check_settings, writes_run_dir
from ftlab.tasks import Splits, TaskSpec, load_task, make_splits
from ftlab.zo.mezo import MeZO
from ftlab.zo.trajectory import TrajectoryLog, replay

StepCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class RunData:
    """A task with its splits, as the loop consumes it."""

    spec: TaskSpec
    splits: Splits


def load_run_data(cfg: TrainConfig) -> RunData:
    """Load the task of ``cfg.data`` and split it deterministically."""
    d = cfg.data
    spec, examples = load_task(d.task, template=d.template, options=d.options)
    splits = make_splits(examples, seed=cfg.seed, n_train=d.n_train, n_dev=d.n_dev,
                         n_test=d.n_test, k_per_class=d.k_per_class, data_seed=d.data_seed)
    return RunData(spec, splits)


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the training batch at ``step``: consecutive slices of one seeded permutation
    per epoch. A pure function of its arguments, so a resumed run sees the same batches."""
    return [_epoch_order(n, seed, p // n)[p % n]
            for p in range(step * batch_size, (step + 1) * batch_size)]


def make_closure(optimizer: torch.optim.Optimizer, objectives: Callable[[], torch.Tensor]
                 | list[Callable[[], torch.Tensor]], max_grad_norm: float | None, *,
                 no_sync: Callable[[], Any] | None = None,
                 autocast: Callable[[], Any] | None = None) -> Callable[[], torch.Tensor]:
    """The closure passed to ``optimizer.step``: the mean of ``objectives`` (one per
    micro-batch of equal size, evaluated one after the other, so only one micro-batch's
    activations are alive at a time), with backward (first order: each micro-batch's loss / k
    is backpropagated and the gradients accumulate) or forward only under ``no_grad``
    (optimizers flagged ``zeroth_order``: each perturbation is evaluated on every micro-batch).
    The mean of equal micro-batches' mean losses is the whole batch's mean loss.

    First order only: ``no_sync()`` is entered around every micro-batch but the last (data
    parallel: gradients are communicated once, after the last backward), and ``autocast()``
    around every forward (bf16 autocast; the backward runs outside it, as PyTorch recommends)."""
    parts = objectives if isinstance(objectives, list) else [objectives]
    k = len(parts)
    if is_zeroth_order(optimizer):
        @torch.no_grad()
        def zo_closure() -> torch.Tensor:
            total = parts[0]()
            for part in parts[1:]:
                total = total + part()
            return total / k if k > 1 else total
        return zo_closure

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, part in enumerate(parts):
            with (no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext()):
                with (autocast() if autocast is not None else contextlib.nullcontext()):
                    loss = part()
                (loss / k if k > 1 else loss).backward()
            total = total + loss.detach()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
        return total / k if k > 1 else total
    return closure


def micro_batches(items: list[Any], k: int) -> list[list[Any]]:
    """``items`` cut into ``k`` consecutive equal micro-batches (``k`` divides its length)."""
    if len(items) % k:
        raise FtlabError(f"a batch of {len(items)} examples per process cannot be cut into grad_accum={k} "
                         f"equal micro-batches; make batch_size a multiple of grad_accum x processes")
    size = len(items) // k
    return [items[i * size:(i + 1) * size] for i in range(k)]


def _metric_name(spec: TaskSpec) -> str:
    return "accuracy" if spec.kind == "classification" else "f1"


def _prepare_output(cfg: TrainConfig, out: Path) -> None:
    """Write the run's config.json, or check that an existing one is this same config (a
    folder in which nothing was trained yet takes the new config)."""
    run = RunDir(out)
    new = json.loads(json.dumps(to_dict(cfg)))
    if run.config.exists() and run.started():
        old = read_written_json(run.config)
        if not isinstance(old, dict):
            raise damaged(run.config, ValueError(f"expected a JSON object, got {type(old).__name__}"))
        # A key the old config lacks (written before the field existed) had its default value.
        check_settings(out, "run", old, new, defaults=json.loads(json.dumps(to_dict(TrainConfig()))))
    else:
        atomic_write_json(run.config, new)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run's tail),
    including a line the kill cut in half."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@writes_run_dir("train", "cfg.output_dir")  # validates cfg, then claims and locks the folder (rank 0)
def train(cfg: TrainConfig, *, progress: bool = True, callback: StepCallback | None = None,
          model_and_tokenizer: tuple[nn.Module, Any] | None = None,
          data: RunData | None = None) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; resumes from ``cfg.output_dir`` if a checkpoint is there.

    ``model_and_tokenizer`` and ``data`` let callers (tests, the demo) pass objects they
    already hold; by default they are loaded from ``cfg``. ``callback(step, record)`` runs after
    every step, after any checkpoint of that step is on disk. Returns the run's results
    (also written to ``results.json``).
    """
    rank, world = init_from_env(cfg.device)
    main = rank == 0  # the only process that writes to the run folder
    # Fail fast on a batch the ranks, then the micro-batches, cannot split.
    micro_batches(shard(list(range(cfg.batch_size)), rank, world), cfg.grad_accum)
    autocast = bf16_autocast(rank_device(cfg.device)) if cfg.autocast else None  # refused where bf16 is not
    out = Path(cfg.output_dir)
    if main:  # the folder exists: @writes_run_dir claimed it
        _prepare_output(cfg, out)
    barrier()  # the other ranks read the folder (results, checkpoint) only once rank 0 checked it
    if (RunDir(out).results).exists():
        return RunDir(out).read_results()

    # FSDP loads on the CPU and shards onto the device; offload keeps the weights in CPU memory
    # (checked to fit first); device_map places the model itself.
    if cfg.offload and model_and_tokenizer is None:
        _check_offload_memory(cfg)
    model, tokenizer = model_and_tokenizer or load_model(
        cfg.model, dtype=cfg.dtype, device="cpu" if cfg.fsdp or cfg.offload else rank_device(cfg.device),
        device_map=cfg.device_map)
    data = data or load_run_data(cfg)
    module, optimizer, scheduler = build_trainer(cfg, model)
    zeroth_order = is_zeroth_order(optimizer)
    # The ranks' loss differences are averaged in MeZO._estimate (its variants inherit it).
    if world > 1 and zeroth_order and not isinstance(optimizer, MeZO):
        raise FtlabError(f"data-parallel training is not implemented for optimizer={cfg.optimizer}; "
                         f"run it in a single process")
    # The log's header records how z is made (a replay with other settings is refused) and the
    # run (a hash of its config: deterministic, so identical runs write identical logs).
    log = TrajectoryLog(out, run_id=_run_id(cfg), z=optimizer.z_spec()) \
        if is_zeroth_order(optimizer) else None
    encoder = Encoder(tokenizer, data.spec, max_length=cfg.data.max_length)
    metric = _metric_name(data.spec)
    train_set = data.splits.train
    if not train_set:
        raise FtlabError(f"task {data.spec.name!r}: the training split is empty")

    state = _resume(out, module, optimizer, scheduler, log, main, sharded_first_order=cfg.fsdp and not zeroth_order)
    if main:
        _truncate_metrics(RunDir(out).metrics, state["step"])
    # First order: DDP (or the FSDP2 module) for the forwards, Local SGD, communication rounds.
    dp = None if zeroth_order else DataParallel(
        module, world, rank_device(cfg.device), cfg.local_sgd if cfg.local_sgd.period is not None else None,
        cfg.steps, state["step"], sharded=cfg.fsdp)
    if dp is not None:
        dp.load_state_dict(state.get("dp"))
        if dp.per_rank_state and state["step"] > 0:
            _load_rank_state(module, optimizer, load_extra(RunDir(out).checkpoint), rank)
        dp.start(optimizer.param_groups[0]["lr"])
    forward_module = dp.forward_module if dp is not None else module

    def dev_eval(step: int) -> None:
        _flush(optimizer)
        # Local SGD: the ranks' average weights are evaluated (and saved as the best).
        with dp.averaged() if dp is not None else contextlib.nullcontext():
            result = _evaluate(module, tokenizer, data.spec, data.splits.dev, cfg, rank, world)
            score = result.metrics[metric]
            if main:
                _log(RunDir(out).metrics, {"step": step, "split": "dev", **result.metrics})
            if state["best_score"] is None or score > state["best_score"]:
                state.update(best_score=score, best_step=step)
                if main or cfg.fsdp:  # sharded: every rank takes part in gathering the tensors
                    save_trainable(module, RunDir(out).best, write=main)

    if state["step"] == 0 and data.splits.dev and cfg.eval_every:
        dev_eval(0)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {cfg.mode}/{cfg.optimizer}",
               disable=not (progress and main), unit="step")
    # Zeroth-order forwards run in eval mode (no dropout noise in the loss difference).
    module.train(not is_zeroth_order(optimizer))
    for step in range(state["step"], cfg.steps):
        batch = shard(batch_indices(len(train_set), cfg.batch_size, cfg.seed_of("order"), step), rank, world)
        examples = [train_set[i] for i in batch]
        parts = [objectives.objective_fn(cfg.objective, forward_module, tokenizer, encoder, micro,
                                         model_device(module), lockstep=cfg.offload)  # offload: +eps/-eps in one pass
                 for micro in micro_batches(examples, cfg.grad_accum)]
        closure = make_closure(optimizer, parts, cfg.max_grad_norm, autocast=autocast,
                               no_sync=dp.no_sync if dp is not None and world > 1 else None)
        lr = optimizer.param_groups[0]["lr"]
        # Dropout draws from the global RNG: seed it per step (and per rank: each holds other
        # examples) so a resumed run matches exactly.
        seed = cfg.seed_of("order") * 1_000_003 + step
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * world + rank if dp is not None else seed)
            result = optimizer.step(closure)
        loss = dp.mean_loss(result) if dp is not None else float(result.detach())
        skipped = _check_finite(loss, step, lr, optimizer, cfg, state, out)
        scheduler.step()
        state["step"] = step + 1
        if dp is not None:
            dp.after_step(optimizer.param_groups[0]["lr"])  # Local SGD: averages at the end of a round
            state["dp"] = dp.state_dict()
        record = {"step": step + 1, "split": "train", "loss": None if skipped else loss, "lr": lr,
                  **({"skipped": "non-finite loss"} if skipped else {}),
                  **({"comm_rounds": dp.rounds} if dp is not None and dp.counted else {}),
                  **({"H": dp.period} if dp is not None and dp.local else {})}
        if main:
            _log(RunDir(out).metrics, record)
        if cfg.eval_every and data.splits.dev and ((step + 1) % cfg.eval_every == 0
                                                   or step + 1 == cfg.steps):
            dev_eval(step + 1)
        if log is not None:
            done = optimizer.history.pop()
            if main:
                log.append(step, done)
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == cfg.steps:
            if dp is not None and (dp.per_rank_state or cfg.fsdp):  # every rank takes part
                _checkpoint(out, module, optimizer, scheduler, state, log, dp=dp, main=main)
            elif main:
                _checkpoint(out, module, optimizer, scheduler, state, log)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", best=state["best_score"])
        if callback:
            callback(step + 1, record)
    bar.close()
    return _finish(cfg, out, module, tokenizer, data, state, progress, main, optimizer, rank, world)


def _check_finite(loss: float, step: int, lr: float, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                  state: dict[str, Any], out: Path) -> bool:
    """True if the step's loss was non-finite and a zeroth-order optimizer skipped its update
    (theta untouched); raises once more than ``cfg.max_skipped_steps`` were skipped, or at
    once for first-order optimizers (their update has already used the bad gradient)."""
    if math.isfinite(loss):
        return False
    state["skipped"] = state.get("skipped", 0) + 1
    if is_zeroth_order(optimizer) and state["skipped"] <= cfg.max_skipped_steps:
        return True
    raise FtlabError(f"loss became {loss} at step {step} ({state['skipped']} non-finite step(s)): lower "
                     f"the lr (now {lr:g}) or use float32; the last good checkpoint is in {RunDir(out).checkpoint}")


def build_trainer(cfg: TrainConfig, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The module to train (``cfg.mode``), its optimizer and lr scheduler, deterministically
    from ``cfg``'s init and zo seeds (so a replay or a resume rebuilds exactly the same starting point)."""
    with torch.random.fork_rng(devices=[]):  # adapter inits (peft) draw from the global RNG
        torch.manual_seed(cfg.seed_of("init"))
        module = prepare_model(model, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=cfg.seed_of("init"))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    if cfg.fsdp:
        _check_shardable(cfg)
        shard_model(module, rank_device(cfg.device))  # parameters become DTensor shards, before MeZO sees them
    optimizer = build_offloaded(cfg, module) if cfg.offload else build_optimizer(cfg, module)
    if hasattr(optimizer, "attach"):
        optimizer.attach(module)  # exact-mode MeZO perturbs inside the module's forwards
    if cfg.objective not in ("loss", "quad") and not is_zeroth_order(optimizer):
        raise FtlabError(f"objective {cfg.objective!r} has no gradient; use optimizer=mezo "
                         "(or objective=loss)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, cfg.steps, cfg.warmup_steps))
    return module, optimizer, scheduler


def _evaluate(module: nn.Module, tokenizer, spec: TaskSpec, examples: list, cfg: TrainConfig, rank: int,
              world: int, progress: bool = False, desc: str = "eval") -> EvalResult:
    """:func:`ftlab.evaluate.evaluate` of ``examples``, split over the ranks and gathered: each
    rank evaluates its contiguous part, the predictions are gathered in order and the metrics
    computed over all of them (the same numbers as one process, up to the rounding of the
    summed losses and of the batches' padding). Under FSDP every rank evaluates everything (its
    forwards need every rank)."""
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.data.max_length)
    if world == 1 or cfg.fsdp:
        return evaluate(module, tokenizer, spec, examples, progress=progress, desc=desc, **kw)
    part = split_evenly(list(examples), rank, world)
    mine = evaluate(module, tokenizer, spec, part, progress=progress, desc=desc, **kw) if part else None
    gathered = all_gather(([], 0.0) if mine is None else (mine.predictions, mine.metrics.get("loss", 0.0) * len(part)))
    predictions = [p for preds, _ in gathered for p in preds]
    metrics = _metrics(spec, examples, predictions)
    if spec.kind == "classification":
        metrics["loss"] = sum(loss_sum for _, loss_sum in gathered) / len(examples)
    return EvalResult(metrics, predictions)


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
    return lambda: torch.autocast(device_type=kind, dtype=torch.bfloat16)


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Activation checkpointing of the transformer blocks (recomputed in the backward), through
    transformers' own switch on the model (under peft: its base model), non-reentrant."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise FtlabError(f"gradient_checkpointing=true: {type(base).__name__} does not support it; set it to false")
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name is deprecated)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_rank_state(module: nn.Module, optimizer: torch.optim.Optimizer, extra: Any, rank: int) -> None:
    """Restore this rank's own weights and optimizer state from a Local SGD checkpoint."""
    from ftlab.distributed import copy_full_into

    if not extra or "ranks" not in extra or rank >= len(extra["ranks"]):
        raise FtlabError("the checkpoint holds no per-rank Local SGD state for this number of processes; "
                         "resume with the same torchrun --nproc_per_node, or start afresh with --overwrite")
    mine = extra["ranks"][rank]
    with torch.no_grad():
        for name, p in trainable_parameters(module):
            copy_full_into(p, mine["trainable"][name])
    optimizer.load_state_dict(mine["optimizer"])


def _load_sharded_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: Any) -> dict[str, Any]:
    """Restore a first-order FSDP run: whole tensors and the whole optimizer state (saved by
    rank 0, see :func:`_full_optimizer_state`), each rank keeping its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    load_trainable(module, path / "trainable.safetensors")
    try:
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and zip errors have no common base
        raise damaged(path / "optimizer.pt", e) from None
    set_optimizer_state_dict(module, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    return _check_state(read_written_json(path / "state.json"), path / "state.json")


def _full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of an FSDP2-sharded module, whole (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def build_offloaded(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """Offloaded MeZO (:mod:`ftlab.zo.offload`): the decoder blocks stay in CPU memory and are
    brought to ``cfg.device`` one at a time, the +eps and -eps forwards in lockstep."""
    from ftlab.zo.offload import OffloadedMeZO

    if cfg.optimizer != "mezo":
        raise FtlabError(f"offload=true is implemented for optimizer=mezo (got {cfg.optimizer})")
    s = cfg.zo
    return OffloadedMeZO(param_groups(module, cfg.weight_decay), model=module, device=rank_device(cfg.device),
                         lr=cfg.lr, eps=s.eps, n_perturbations=s.n_perturbations, one_sided=s.one_sided,
                         distribution=s.distribution, generator=s.generator, chunk_size=s.chunk_size,
                         exact=s.exact, seed=cfg.seed_of("zo"))


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


def _flush(optimizer: torch.optim.Optimizer | None) -> None:
    """Apply an offloaded optimizer's queued updates (a no-op for every other optimizer)."""
    if optimizer is not None and hasattr(optimizer, "flush"):
        optimizer.flush()


def _check_shardable(cfg: TrainConfig) -> None:
    """What sharded MeZO supports: in-place perturbation (float32 master weights; exact mode
    perturbs inside module forwards, which FSDP runs on gathered copies) and per-tensor rules
    that do not need the whole tensor (sparse MeZO's magnitude quantile does). First-order
    training shards with no such limits (FSDP2 reduce-scatters the gradients)."""
    if cfg.optimizer in ("adamw", "sgd"):
        return
    if cfg.optimizer == "sparse-mezo":
        raise FtlabError("fsdp=true: sparse-mezo's per-tensor magnitude threshold needs whole tensors; "
                         "use mezo, zo-sign, zo-momentum or zo-adam")
    if cfg.zo.exact or (cfg.zo.exact is None and cfg.dtype in ("bfloat16", "float16")):
        raise FtlabError(f"fsdp=true perturbs the float32 shards in place; exact mode (dtype={cfg.dtype}, "
                         f"zo.exact={cfg.zo.exact}) is not implemented under FSDP: use dtype=float32")
    if cfg.zo.generator != "strided":
        raise FtlabError(f"fsdp=true needs zo.generator=strided (z indexed by the global element, so each "
                         f"rank makes its shard's part); got {cfg.zo.generator!r}")


def _checkpoint(out: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                state: dict[str, Any], log: TrajectoryLog | None, dp: DataParallel | None = None,
                main: bool = True) -> None:
    """Save resumable state. A zeroth-order run's checkpoint is its trajectory log (KBs) and
    the loop counters; other runs save trainable tensors and optimizer state. Called by every
    rank when ``dp`` holds per-rank state (Local SGD: each rank's weights and optimizer state
    are gathered into ``extra.pt``) or sharded tensors (FSDP: gathered whole); rank 0 writes."""
    _flush(optimizer)
    if dp is not None and dp.per_rank_state:
        ranks = gather_to_main({"trainable": trainable_state(module), "optimizer": optimizer.state_dict()})
        if main:
            save_checkpoint(RunDir(out).checkpoint, module, optimizer, scheduler, state, extra={"ranks": ranks})
    elif dp is not None and dp.sharded:
        trainable, optimizer_state = trainable_state(module), _full_optimizer_state(module, optimizer)
        if main:
            save_checkpoint(RunDir(out).checkpoint, module, optimizer, scheduler, state, trainable=trainable,
                            optimizer_state=optimizer_state)
    elif log is None:
        save_checkpoint(RunDir(out).checkpoint, module, optimizer, scheduler, state)
    else:
        log.sync()
        atomic_write_json(RunDir(out).checkpoint_state, state)


def _resume(out: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            log: TrajectoryLog | None, main: bool = True, sharded_first_order: bool = False) -> dict[str, Any]:
    """Restore the last checkpoint, if any; returns the loop counters. Every rank restores
    from rank 0's files; only rank 0 (``main``) rewrites them."""
    state_path = RunDir(out).checkpoint_state
    fresh = {"step": 0, "best_score": None, "best_step": None}
    if main:
        recover_dir(RunDir(out).checkpoint)  # finish or undo a checkpoint replace a kill interrupted
    barrier()
    if sharded_first_order:
        return _load_sharded_checkpoint(RunDir(out).checkpoint, module, optimizer, scheduler) \
            if state_path.exists() else fresh
    if log is None:
        return _check_state(load_checkpoint(RunDir(out).checkpoint, module, optimizer, scheduler), state_path) \
            if state_path.exists() else fresh
    state = _check_state(read_written_json(state_path), state_path) if state_path.exists() else fresh
    # Replay (which checks the log against this run's seeds) before touching the file, so a
    # corrupted or foreign log is reported and left as it is. Up to the checkpoint only: another
    # rank may read the log before or after rank 0 truncates it.
    done = replay(log, optimizer, scheduler, steps=state["step"], allow_torn_tail=True)
    if done != state["step"]:
        raise FtlabError(f"{log.path} holds {done} steps but the checkpoint is at step {state['step']}: "
                         "the log was cut or replaced; restore it, or start afresh with --overwrite")
    if main:
        log.truncate(state["step"])  # steps after the checkpoint are redone, identically
    return state


def _run_id(cfg: TrainConfig) -> str:
    """A short, deterministic id of a run's config, wherever it is saved (recorded in its
    trajectory log's header)."""
    import hashlib

    identity = {k: v for k, v in to_dict(cfg).items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _check_state(state: Any, path: Path) -> dict[str, Any]:
    """The loop counters of a checkpoint, checked (a damaged state.json is named, not a KeyError)."""
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
            and "best_score" in state and "best_step" in state):
        raise damaged(path, ValueError("expected an object with step, best_score and best_step"))
    return state


def replay_run(run_dir: str | Path, steps: int | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a MeZO run's weights from its base model and trajectory log (first ``steps``
    steps, default all): bitwise the weights the run had after those steps."""
    run = RunDir(run_dir)
    cfg = from_dict(TrainConfig, run.read_config(), str(run.config))
    if not is_zeroth_order(cfg.optimizer):
        raise FtlabError(f"{run_dir} is a {cfg.optimizer} run; only zeroth-order runs can be replayed")
    # A sharded run replays in one process: z is indexed by the global element.
    # An offloaded run was exact (its CPU master never perturbed): replay with exact arithmetic.
    zo = dataclasses.replace(cfg.zo, exact=True) if cfg.offload else cfg.zo
    cfg = dataclasses.replace(cfg, fsdp=False, device_map=None, offload=False, zo=zo)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    module, optimizer, scheduler = build_trainer(cfg, model)
    if (run.path / "init.safetensors").exists():  # a run whose adapters were initialised elsewhere (ZOTrainer)
        load_trainable(module, run.path / "init.safetensors")
    # A finished run's log must hold every step (a cut log is an error, not a shorter replay).
    expect = steps if steps is not None else (cfg.steps if run.finished() else None)
    replay(TrajectoryLog(run.path), optimizer, scheduler, steps=steps, expect_steps=expect)
    return module, tokenizer


def _finish(cfg: TrainConfig, out: Path, module: nn.Module, tokenizer, data: RunData,
            state: dict[str, Any], progress: bool, main: bool = True,
            optimizer: torch.optim.Optimizer | None = None, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Load the best weights, evaluate them on test, save the model and the results (the
    saving on rank 0 only; every rank returns the same results)."""
    _flush(optimizer)  # offload: queued updates land before best.safetensors is copied in
    barrier()  # every rank then loads the last best.safetensors rank 0 wrote, not an older one
    if (RunDir(out).best).exists() and data.splits.dev and cfg.eval_every:
        load_trainable(module, RunDir(out).best)
    else:
        state.update(best_step=cfg.steps)
    test: EvalResult | None = None
    if data.splits.test:
        test = _evaluate(module, tokenizer, data.spec, data.splits.test, cfg, rank, world,
                         progress=progress and main, desc="test")
    sp = data.splits
    results = {"best_step": state["best_step"], "best_dev": state["best_score"],
               "test": test.metrics if test else None, "steps": cfg.steps,
               "splits": {"train": len(sp.train), "dev": len(sp.dev), "test": len(sp.test), "note": sp.note}}
    if cfg.fsdp:
        module = _unsharded_copy(cfg, module, main)
    if main:
        save_trained(module, tokenizer, RunDir(out).model)
        atomic_write_json(RunDir(out).results, results)
    return results


def _unsharded_copy(cfg: TrainConfig, module: nn.Module, main: bool) -> nn.Module | None:
    """For saving a sharded run's model: its trainable tensors gathered from every rank (all
    call this) into a fresh, unsharded copy of the base model built on rank 0's CPU (None on
    the other ranks). The frozen weights are the base model's own, as in the run."""
    from ftlab.checkpoint import trainable_state
    from ftlab.distributed import copy_full_into

    state = trainable_state(module)
    if not main:
        return None
    base, _ = load_model(cfg.model, dtype=cfg.dtype, device="cpu")
    plain = prepare_model(base, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=cfg.seed_of("init"))
    for name, p in trainable_parameters(plain):
        copy_full_into(p, state[name])
    return plain
