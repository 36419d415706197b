"""The one training loop, for every optimizer whose ``step(closure)`` takes a closure returning
the loss: AdamW and SGD (the closure runs the backward) and the zeroth-order optimizers of
:mod:`ftlab.zo`, which set ``zeroth_order = True`` and get a closure that only runs forwards.

:func:`train` reads top to bottom: it builds a parallelism strategy once from the config
(:mod:`ftlab.parallel`: one process, DDP, Local SGD, FSDP2, zeroth-order data parallel,
offload), a checkpointer from it (:mod:`ftlab.checkpoint`), keeps the loop's counters in one
:class:`~ftlab.checkpoint.TrainState`, and steps; nothing inside the step loop asks which rank
or mode it runs in. The run folder's layout is :class:`ftlab.rundir.RunDir`'s; optimizers, their
parameter groups and the lr schedule are :mod:`ftlab.optim`'s.

Data parallel (launched with ``torchrun``): ``batch_size`` is the global batch, each rank trains
on its equal slice of it, and only rank 0 writes the folder; dev and test evaluations give every
rank the same metrics, so every rank keeps the same best step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ftlab import objectives
from ftlab.checkpoint import (
    TrainState,
    check_finite_weights,
    check_log_config,
    flush,
    load_trainable,
    read_trainable,
    saved_config_ids,
)
from ftlab.config import TrainConfig, from_dict, to_dict
from ftlab.distributed import barrier
from ftlab.errors import FtlabError, damaged
from ftlab.evaluate import EvalResult, model_device
from ftlab.io import atomic_write_json, file_sha256, json_sha256
from ftlab.models import EMBEDDED_MODELS, load_model, parse_device, prepare_model, save_trained
from ftlab.models.loading import short_reason
from ftlab.objectives import Encoder
from ftlab.optim import build_optimizer, is_zeroth_order, lr_factor
from ftlab.parallel import Single, build_parallelism, micro_batches
from ftlab.reporting import MetricsLog, reporters
from ftlab.rundir import RunDir, read_written_json
from ftlab.runs import check_settings, writes_run_dir
from ftlab.tasks import Splits, TaskSpec, load_task, make_splits
from ftlab.zo.batched import batched_objective
from ftlab.zo.trajectory import TrajectoryLog, replay

StepCallback = Callable[[int, dict[str, Any]], None]

logger = logging.getLogger(__name__)


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


def data_hashes(data: RunData) -> dict[str, str]:
    """The sha256 (hex) of what a run trains and is evaluated on: the task's template and options
    (``spec``) and each split's examples in order (ids, fields, labels, answers). Recorded in every
    checkpoint, so a resume on edited data is refused (:func:`_bind_checkpoint`)."""
    def sha(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    spec = data.spec
    out = {"spec": sha([spec.name, spec.template, list(spec.options), spec.metric, spec.demo_separator,
                        spec.max_new_tokens])}
    for split in ("train", "dev", "test"):
        out[split] = sha([[e.id, dict(e.fields), e.label, list(e.answers)] for e in getattr(data.splits, split)])
    return out


@functools.lru_cache(maxsize=4)
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
    if is_zeroth_order(optimizer) and k == 1 and hasattr(parts[0], "losses"):
        return parts[0]  # a batched objective (zo.batched: grad_accum 1), which the optimizer calls under no_grad
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


def _metric_name(spec: TaskSpec) -> str:
    return "accuracy" if spec.kind == "classification" else "f1"


def _check_output(cfg: TrainConfig, run: RunDir) -> bool:
    """Check that a started run's config.json is this same config; returns whether config.json
    is still to be written (a folder in which nothing was trained yet takes the new config, once
    the model and the data loaded: see :func:`_write_config`). Writes nothing. ``keep`` may
    change on resuming (it only picks what :func:`_finish` saves): an unfinished run's
    config.json then takes the new value; a finished run's results.json says what its model/ holds."""
    if not (run.config.exists() and run.started()):
        return True
    old = read_written_json(run.config)
    if not isinstance(old, dict):
        raise damaged(run.config, ValueError(f"expected a JSON object, got {type(old).__name__}"))
    # A key the old config lacks (written before the field existed) had its default value.
    new = json.loads(json.dumps(to_dict(cfg)))
    # Where the metrics are mirrored (report_to) may change between a run and its resume, too.
    check_settings(run.path, "run", old, new, defaults=json.loads(json.dumps(to_dict(TrainConfig()))),
                   ignore=("keep", "report_to"))
    return old.get("keep") != new["keep"] and not run.finished()


def _write_config(cfg: TrainConfig, run: RunDir) -> None:
    """Write the run's config.json (see :func:`_check_output`)."""
    atomic_write_json(run.config, json.loads(json.dumps(to_dict(cfg))))


def check_inputs(cfg: TrainConfig) -> RunData:
    """What :func:`train` loads from ``cfg``, checked before any folder is touched (``ftlab train
    --overwrite`` deletes the old run only after this): the device, the model name (an embedded
    model, a local model folder, or a hub model whose config loads) and the data, which is
    returned (pass it to :func:`train`)."""
    if cfg.device_map is None:
        parse_device(cfg.device)
    data = _check_data(load_run_data(cfg))
    if cfg.model not in EMBEDDED_MODELS:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(cfg.model)
        except Exception as e:  # transformers raises OSError, ValueError, HTTP errors, ...
            raise FtlabError(f"config.model: cannot load model {cfg.model!r} (not an embedded model: "
                             f"{', '.join(EMBEDDED_MODELS)}; nor a local model folder or a hub model): "
                             f"{short_reason(e)}") from None
    return data


@writes_run_dir("train", "cfg.output_dir")  # validates cfg, then claims and locks the folder (rank 0)
def train(cfg: TrainConfig, *, progress: bool = True, callback: StepCallback | None = None,
          model_and_tokenizer: tuple[nn.Module, Any] | None = None, data: RunData | None = None) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; resumes from ``cfg.output_dir`` if a checkpoint is there.

    ``model_and_tokenizer`` and ``data`` let callers (tests, the demo) pass objects they already
    hold; by default they are loaded from ``cfg``. ``callback(step, record)`` runs after every
    step, after any checkpoint of that step is on disk. Returns the run's results (also written
    to ``results.json``)."""
    parallel = build_parallelism(cfg)  # joins torchrun's process group; see ftlab.parallel
    run = RunDir(cfg.output_dir)
    # The folder exists (@writes_run_dir claimed it); rank 0 checks a started run's config.
    new_config = parallel.main and _check_output(cfg, run)
    barrier()  # the other ranks read the folder (results, checkpoint) only once rank 0 checked it
    if run.finished():
        return run.read_results()
    model, tokenizer = model_and_tokenizer or parallel.load_model()
    data = _check_data(data or load_run_data(cfg))
    if new_config:  # only once the model and the data loaded: a failed load leaves no config.json
        _write_config(cfg, run)
    module, optimizer, scheduler = build_trainer(cfg, model, parallel)
    parallel.setup(module, optimizer)
    checkpointer = parallel.checkpointer(run, optimizer)
    state = checkpointer.resume(module, optimizer, scheduler)
    _bind_checkpoint(cfg, run, data, state)
    parallel.resume(state, optimizer.param_groups[0]["lr"])
    log = _metrics_log(cfg, run, parallel.main, state)
    encoder = Encoder(tokenizer, data.spec, max_length=cfg.data.max_length)
    _give_full_batch(cfg, parallel, optimizer, tokenizer, encoder, data.splits.train)
    evaluate_dev = functools.partial(_evaluate_dev, cfg, parallel, module, tokenizer, data, optimizer, state, run, log)

    if state.step == 0 and data.splits.dev and cfg.eval_every:
        evaluate_dev(0)
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.mode}/{cfg.optimizer}",
               disable=not (progress and parallel.main), unit="step")
    module.train(not is_zeroth_order(optimizer))  # zeroth order: no dropout noise in the loss difference
    for step in range(state.step, cfg.steps):
        batch = parallel.shard(batch_indices(len(data.splits.train), cfg.batch_size, cfg.seed_of("order"), step))
        lr = optimizer.param_groups[0]["lr"]
        loss = _step(cfg, parallel, optimizer, tokenizer, encoder, [data.splits.train[i] for i in batch], step)
        skipped = _check_finite(loss, step, lr, optimizer, cfg, state, run)
        scheduler.step()
        state.step = step + 1
        record = {"step": step + 1, "split": "train", "loss": None if skipped else loss, "lr": lr,
                  **({"skipped": "non-finite loss"} if skipped else {}), **parallel.after_step(optimizer)}
        state.parallel = parallel.state_dict()
        log(record)
        if data.splits.dev and _due(cfg.eval_every, step, cfg.steps, at_end=bool(cfg.eval_every)):
            evaluate_dev(step + 1)
        checkpointer.record(step, optimizer)
        if _due(cfg.checkpoint_every, step, cfg.steps, at_end=True):
            checkpointer.save(module, optimizer, scheduler, state)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", best=state.best_score)
        if callback:
            callback(step + 1, record)
    bar.close()
    return log.end(_finish(cfg, parallel, run, module, tokenizer, data, optimizer, state, progress))


def _check_data(data: RunData) -> RunData:
    if not data.splits.train:
        raise FtlabError(f"task {data.spec.name!r}: the training split is empty")
    return data


def _bind_checkpoint(cfg: TrainConfig, run: RunDir, data: RunData, state: TrainState) -> None:
    """Refuse to continue a checkpoint under another ``config.json`` or on other data than its
    steps were trained on (edited between a kill and the resume), then record both in ``state``
    for the next checkpoint. A checkpoint written before ftlab recorded them is not checked."""
    ids, hashes = saved_config_ids(run), data_hashes(data)
    config = ids[0]  # the id of config.json as written: recorded for the next checkpoint
    where = f"the checkpoint in {run.checkpoint} (step {state.step})"
    if state.config is not None and state.config not in ids:
        raise FtlabError(f"{run.config} is not the config {where} was trained under (config id {config}, the "
                         f"checkpoint's {state.config}): it was edited; restore it, or start afresh with --overwrite")
    for part, value in hashes.items() if state.data is not None else ():
        if state.data.get(part, value) != value:
            what = "task template and options" if part == "spec" else f"{part} examples"
            raise FtlabError(f"data.task={cfg.data.task!r}: the {what} differ from those {where} was trained on "
                             f"(sha256 {value[:12]}, recorded {str(state.data[part])[:12]}): the data file was "
                             f"edited since the run started; restore it, or start afresh with --overwrite")
    if run.best.exists():  # kept by the run, and loaded at its end with keep=best: checked now, not then
        read_trainable(run.best)
    state.config, state.data = config, hashes


def _step(cfg: TrainConfig, parallel: Single, optimizer: torch.optim.Optimizer, tokenizer: Any,
          encoder: Encoder, examples: list, step: int) -> float:
    """One optimizer step on this rank's ``examples``; returns the step's (ranks' mean) loss."""
    device = model_device(parallel.module)
    parts = [_objective(cfg, parallel, tokenizer, encoder, micro, device)
             for micro in micro_batches(examples, cfg.grad_accum)]
    closure = make_closure(optimizer, parts, cfg.max_grad_norm, autocast=parallel.autocast, no_sync=parallel.no_sync)
    # Dropout draws from the global RNG: seeded per step (and per rank where each holds other
    # examples) so a resumed run matches exactly.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(parallel.step_seed(cfg.seed_of("order") * 1_000_003 + step))
        return parallel.mean_loss(optimizer.step(closure))


def _give_full_batch(cfg: TrainConfig, parallel: Single, optimizer: torch.optim.Optimizer, tokenizer: Any,
                     encoder: Encoder, train_split: list) -> None:
    """An optimizer that also minimises a full-batch objective (``needs_full_batch``: MeZO-SVRG)
    gets, once, a factory of it over the training split (its ``set_full_batch``)."""
    if getattr(optimizer, "needs_full_batch", False):
        make = functools.partial(_full_batch_objective, cfg, parallel, tokenizer, encoder, train_split)
        optimizer.set_full_batch(make, len(train_split))


def _full_batch_objective(cfg: TrainConfig, parallel: Single, tokenizer: Any, encoder: Encoder, train_split: list,
                          size: int) -> tuple[Callable[[], torch.Tensor], int]:
    """The mean objective over ``size`` training examples, the same ones at every call (a seeded
    choice), run in micro-batches of the training micro-batch's size (so no forward is larger
    than a training step's); and the number of those batch forwards."""
    chosen = sorted(random.Random(f"{cfg.seed_of('order')}:full-batch").sample(range(len(train_split)), size))
    width = cfg.batch_size // cfg.grad_accum
    device = model_device(parallel.module)
    parts = [(len(part), _objective(cfg, parallel, tokenizer, encoder, [train_split[i] for i in part], device))
             for part in (chosen[i:i + width] for i in range(0, size, width))]

    @torch.no_grad()
    def full_batch() -> torch.Tensor:
        return sum(part() * n for n, part in parts) / size  # the example-weighted mean over the micro-batches
    return full_batch, len(parts)


def _objective(cfg: TrainConfig, parallel: Single, tokenizer: Any, encoder: Encoder, examples: list,
               device: torch.device) -> Callable[[], torch.Tensor]:
    """What a step minimises on one micro-batch: ``cfg.objective``'s function of no arguments
    (offload: the +eps and -eps halves in one lockstep pass), or, with ``zo.batched``, one that
    also evaluates many adapter settings in one vmapped forward (FZOO's N + 1 points)."""
    if cfg.zo.batched:
        return batched_objective(parallel.forward_module, encoder, examples, device)
    return objectives.objective_fn(cfg.objective, parallel.forward_module, tokenizer, encoder, examples, device,
                                   lockstep=parallel.lockstep)


def _check_finite(loss: float, step: int, lr: float, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                  state: TrainState, run: RunDir) -> bool:
    """True if the step's loss was non-finite and a zeroth-order optimizer skipped its update
    (theta untouched); raises once more than ``cfg.max_skipped_steps`` were skipped, or at
    once for first-order optimizers (their update has already used the bad gradient)."""
    if math.isfinite(loss):
        return False
    state.skipped += 1
    if is_zeroth_order(optimizer) and state.skipped <= cfg.max_skipped_steps:
        return True
    raise FtlabError(f"loss became {loss} at step {step} ({state.skipped} non-finite step(s)): lower "
                     f"the lr (now {lr:g}) or use float32; the last good checkpoint is in {run.checkpoint}")


def _due(every: int, step: int, total: int, at_end: bool) -> bool:
    """Whether an every-``every``-steps action is due after ``step`` (0-based; the last step too if ``at_end``)."""
    return bool(every and (step + 1) % every == 0) or (at_end and step + 1 == total)


def _evaluate_dev(cfg: TrainConfig, parallel: Single, module: nn.Module, tokenizer: Any, data: RunData,
                  optimizer: torch.optim.Optimizer, state: TrainState, run: RunDir,
                  log: Callable[[dict[str, Any]], None], step: int) -> None:
    """Evaluate on dev, log it, and write the weights of the best score so far to ``best.safetensors``
    (the first of equal scores: a dev curve that never beats step 0 keeps step 0's). They become
    ``model/`` only with ``cfg.keep="best"`` (see :func:`_finish`)."""
    flush(optimizer)
    with parallel.averaged():  # Local SGD: the ranks' average weights are evaluated (and saved as the best)
        result = parallel.evaluate(module, tokenizer, data.spec, data.splits.dev)
        log({"step": step, "split": "dev", **result.metrics})
        score = result.metrics[_metric_name(data.spec)]
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_step = score, step
            parallel.save_trainable(module, run.best)


def _metrics_log(cfg: TrainConfig, run: RunDir, main: bool, state: TrainState) -> MetricsLog:
    """What the loop logs through: rank 0 appends to ``metrics.jsonl`` (after dropping the lines a
    killed run wrote past its checkpoint at ``state.step``; at step 0, every line, the step-0 dev
    evaluation included, since the run redoes it), after checking that the lines kept are those the
    checkpoint saw, and mirrors each record to the reporters of ``cfg.report_to`` (TensorBoard,
    W&B: :mod:`ftlab.reporting`, which drop the same points); the other ranks log nothing."""
    if not main:
        return MetricsLog()
    step = state.step
    if step == 0 and run.metrics.exists() and run.metrics.stat().st_size:
        # No checkpoint (a kill before the first, or a deleted checkpoint/state.json): the run starts
        # again at step 0 and so does its log (its step-0 dev evaluation is redone, not logged twice).
        logger.warning("%s: no checkpoint to resume from (%s); training starts again at step 0 and "
                       "metrics.jsonl is started afresh", run.path, run.checkpoint_state)
    kept = step if step > 0 else -1  # the last step whose records stay
    run.truncate_metrics(kept)
    if state.metrics is not None and (not run.metrics.exists() or file_sha256(run.metrics) != state.metrics):
        raise FtlabError(f"{run.metrics} is damaged (its records up to step {step} are not those written "
                         f"before the checkpoint: a flipped bit, a cut or an edit); restore it, delete "
                         f"{run.checkpoint} to restart the run from step 0, or start afresh with --overwrite")
    return MetricsLog(run.append_metrics, reporters(cfg.report_to, run.path, to_dict(cfg), kept))


def build_trainer(cfg: TrainConfig, model: nn.Module, parallel: Single | None = None
                  ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The module to train (``cfg.mode``), its optimizer and lr scheduler, deterministically
    from ``cfg``'s init and zo seeds (so a replay or a resume rebuilds exactly the same starting
    point). ``parallel`` places the module before the optimizer sees its parameters (FSDP2
    shards it); default: one process."""
    with torch.random.fork_rng(devices=[]):  # adapter inits (peft) draw from the global RNG
        torch.manual_seed(cfg.seed_of("init"))
        module = prepare_model(model, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=cfg.seed_of("init"))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    (parallel or Single(cfg)).prepare(module)
    optimizer = build_optimizer(cfg, module)  # offload: OffloadedMeZO
    if hasattr(optimizer, "attach"):
        optimizer.attach(module)  # exact-mode MeZO perturbs inside the module's forwards
    if cfg.objective not in ("loss", "quad") and not is_zeroth_order(optimizer):
        raise FtlabError(f"objective {cfg.objective!r} has no gradient; use optimizer=mezo "
                         "(or objective=loss)")

    def lr_lambda(step: int) -> float:  # a function, as before: LambdaLR saves no state for it
        return lr_factor(cfg.schedule, step, cfg.steps, cfg.warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return module, optimizer, scheduler


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


# Where a ZOTrainer (ftlab.integrations.hf) keeps its run files inside the Trainer's output_dir, away
# from the config.json, weights and checkpoints the Trainer writes there.
ZOTRAINER_SUBDIR = "ftlab"


def replay_run(run_dir: str | Path, steps: int | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a MeZO run's weights from its base model and trajectory log (first ``steps``
    steps, default all): bitwise the weights the run had after those steps.

    ``run_dir`` is an ``ftlab train`` run folder, a ZOTrainer's output_dir or its ``ftlab/``
    subfolder. Returns the module and the base model's tokenizer (None if the base model folder
    has none: the replay runs no forward)."""
    if steps is not None and steps < 0:
        raise FtlabError(f"steps: must be >= 0 (the number of steps to replay; got {steps})")
    run = _replay_folder(Path(run_dir))
    cfg = _replay_config(run)
    if not is_zeroth_order(cfg.optimizer):
        raise FtlabError(f"{run_dir} is a {cfg.optimizer} run; only zeroth-order runs can be replayed")
    if not run.trajectory.exists() and run.checkpoint_weights.exists():
        raise FtlabError(f"{run_dir} is a {cfg.optimizer} run, whose steps depend on state its log does not "
                         "hold: it was checkpointed as tensors and cannot be replayed; load model/ instead")
    check_log_config(run, TrajectoryLog(run.path))  # an edited config.json would replay to other weights
    # A sharded run replays in one process: z is indexed by the global element.
    # An offloaded run was exact (its CPU master never perturbed): replay with exact arithmetic.
    zo = dataclasses.replace(cfg.zo, exact=True) if cfg.offload else cfg.zo
    cfg = dataclasses.replace(cfg, fsdp=False, device_map=None, offload=False, zo=zo)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, tokenizer="if_present")
    module, optimizer, scheduler = build_trainer(cfg, model)
    if (run.path / "init.safetensors").exists():  # a run whose adapters were initialised elsewhere (ZOTrainer)
        load_trainable(module, run.path / "init.safetensors")
    # A finished run's log must hold every step (a cut log is an error, not a shorter replay).
    expect = steps if steps is not None else (cfg.steps if run.finished() else None)
    replay(TrajectoryLog(run.path), optimizer, scheduler, steps=steps, expect_steps=expect)
    return module, tokenizer


def _replay_folder(run_dir: Path) -> RunDir:
    """The folder holding the run's ``config.json`` and ``trajectory.bin``: ``run_dir`` itself, or,
    for a ZOTrainer's output_dir, its ``ftlab/`` subfolder."""
    sub = RunDir(run_dir / ZOTRAINER_SUBDIR)
    if not RunDir(run_dir).trajectory.exists() and sub.config.is_file():
        return sub
    return RunDir(run_dir)


def _replay_config(run: RunDir) -> TrainConfig:
    """The run's ftlab config; a ``config.json`` that is some other program's (a transformers
    model config that a Trainer's ``save_model`` wrote over it) is a one-line error."""
    data = run.read_config()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if isinstance(data, dict) and data and ("model_type" in data or not fields & data.keys()):
        what = (f"a transformers model config (model_type {data['model_type']!r})" if "model_type" in data
                else f"another program's JSON (keys {', '.join(sorted(data)[:3])}...)")
        raise FtlabError(f"{run.config} is {what}, not the ftlab run config `ftlab replay` needs (a Trainer's "
                         f"save_model writes its model's config.json into the folder it saves to; ZOTrainer keeps "
                         f"its run files in OUTPUT_DIR/{ZOTRAINER_SUBDIR}/, out of its way)")
    return from_dict(TrainConfig, data, str(run.config))


def _finish(cfg: TrainConfig, parallel: Single, run: RunDir, module: nn.Module, tokenizer: Any, data: RunData,
            optimizer: torch.optim.Optimizer, state: TrainState, progress: bool) -> dict[str, Any]:
    """Settle the weights the run keeps (``cfg.keep``: those training ended with, or with
    ``keep="best"`` the best dev evaluation's, loaded from ``best.safetensors``), evaluate them on
    test, save them as ``model/`` and write the results (the saving on rank 0 only; every rank
    returns the same results). ``results.json`` says which weights ``model/`` holds ("model",
    "model_step") beside the dev facts ("best_step", "best_dev": None without dev evaluations)."""
    flush(optimizer)  # offload: queued updates land before the weights are tested and saved
    barrier()  # every rank then loads the last best.safetensors rank 0 wrote, not an older one
    kept = "best" if cfg.keep == "best" and run.best.exists() and data.splits.dev and cfg.eval_every else "last"
    if kept == "best":
        load_trainable(module, run.best)
    check_finite_weights(module, f"{run.model} (nor {run.results})")
    test: EvalResult | None = None
    if data.splits.test:
        test = parallel.evaluate(module, tokenizer, data.spec, data.splits.test, progress=progress and parallel.main,
                                 desc="test")
    sp = data.splits
    results = {"model": kept, "model_step": state.best_step if kept == "best" else cfg.steps,
               "best_step": state.best_step, "best_dev": state.best_score,
               "test": test.metrics if test else None, "steps": cfg.steps,
               "splits": {"train": len(sp.train), "dev": len(sp.dev), "test": len(sp.test), "note": sp.note}}
    saved = parallel.saved_module(module)  # FSDP: gathered into an unsharded copy (every rank takes part)
    if parallel.main:
        record = {"results_sha256": json_sha256(results),
                  **({"metrics_sha256": file_sha256(run.metrics)} if run.metrics.is_file() else {})}
        save_trained(saved, tokenizer, run.model, record=record)
        atomic_write_json(run.results, results)
    return results
