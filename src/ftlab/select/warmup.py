"""LESS step 1: LoRA warm-up on a random p% of the pool, one checkpoint per epoch.

Each checkpoint folder ``<out>/epoch-<e>/`` holds ``trainable.safetensors`` (the LoRA tensors),
``adam.safetensors`` (AdamW's ``exp_avg`` / ``exp_avg_sq`` stored *by parameter name*, so the
gradient features can find the moments of each LoRA tensor whatever the optimizer's parameter
order), and ``state.json`` (epoch, optimizer step, the epoch's mean lr, Adam betas and eps).
Folders are written atomically; a rerun resumes after the last complete epoch and, because the
batch order of an epoch is a pure function of the seed and the epoch, reaches the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ftlab.checkpoint import load_trainable, trainable_state
from ftlab.collate import pad_id
from ftlab.config import Settings, above, at_least, in_fraction, in_unit_interval, needs, setting, unit_pair
from ftlab.errors import FtlabError
from ftlab.io import atomic_dir, atomic_write_json
from ftlab.models import trainable_parameters
from ftlab.objectives import target_logprobs
from ftlab.optim import lr_factor, param_groups
from ftlab.rundir import read_written_json
from ftlab.runs import check_settings
from ftlab.select.data import InstructionExample, collate, encode

_SEP = "::"  # between a parameter name and its moment in adam.safetensors


@needs("constant, linear or cosine")
def _schedule(value: str) -> bool:
    return value in ("constant", "linear", "cosine")


@dataclass
class WarmupSettings(Settings):
    """Warm-up hyper-parameters (LESS: 4 epochs of LoRA with AdamW on a random 5%).

    Attributes:
        percentage: fraction of the pool trained on (0 < p <= 1).
        epochs: epochs, one checkpoint after each.
        lr: peak AdamW learning rate; ``schedule`` and ``warmup_ratio`` shape it over all steps.
        batch_size: examples per optimizer step.
        seed: seed of the subset draw and of every epoch's batch order.
    """

    where = "warmup"

    percentage: float = setting(0.05, check=in_fraction)
    epochs: int = setting(4, check=at_least(1))
    lr: float = setting(2e-5, check=above(0))
    schedule: str = setting("linear", check=_schedule)
    warmup_ratio: float = setting(0.03, check=in_unit_interval)
    batch_size: int = setting(8, check=at_least(1))
    weight_decay: float = setting(0.0, check=at_least(0))
    max_grad_norm: float | None = setting(1.0, check=at_least(0), need=">= 0 (0 or null: no clipping)")
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], check=unit_pair)
    eps: float = setting(1e-8, check=above(0))
    seed: int = 0


@dataclass(frozen=True)
class WarmupCheckpoint:
    """One epoch's checkpoint: its folder, epoch (1-based), the epoch's mean lr, and AdamW's
    betas and eps (what preconditions the pool's gradient features)."""

    path: Path
    epoch: int
    mean_lr: float
    betas: tuple[float, float]
    eps: float


def warmup_subset(examples: Sequence[InstructionExample], percentage: float, seed: int) -> list[InstructionExample]:
    """A seeded random ``percentage`` of ``examples`` (at least one), in pool order."""
    if not 0 < percentage <= 1:
        raise FtlabError(f"warm-up percentage must be in (0, 1], got {percentage}")
    if not examples:
        raise FtlabError("the pool is empty; nothing to warm up on")
    k = max(1, round(len(examples) * percentage))
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(examples), generator=gen)[:k].sort().values
    return [examples[i] for i in picked.tolist()]


def response_loss(module: nn.Module, batch: Any) -> Tensor:
    """Mean over the batch of each example's mean response-token NLL (LESS's loss)."""
    return -target_logprobs(module, batch).mean()


def list_checkpoints(out_dir: str | Path) -> list[WarmupCheckpoint]:
    """The complete epoch checkpoints under ``out_dir``, by epoch."""
    found = []
    for path in Path(out_dir).glob("epoch-*"):
        state_file = path / "state.json"
        if path.is_dir() and state_file.is_file():
            state = read_written_json(state_file)
            found.append(WarmupCheckpoint(path, state["epoch"], state["mean_lr"], tuple(state["betas"]), state["eps"]))
    return sorted(found, key=lambda c: c.epoch)


def load_adam_state(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``{parameter name: (exp_avg, exp_avg_sq)}`` of a checkpoint folder."""
    flat = load_file(str(Path(path) / "adam.safetensors"))
    names = {k.rsplit(_SEP, 1)[0] for k in flat}
    return {n: (flat[f"{n}{_SEP}exp_avg"], flat[f"{n}{_SEP}exp_avg_sq"]) for n in sorted(names)}


def load_checkpoint_into(module: nn.Module, checkpoint: WarmupCheckpoint) -> None:
    """Copy a checkpoint's LoRA tensors into ``module`` (a LoRA model of the same shape)."""
    load_trainable(module, checkpoint.path / "trainable.safetensors")


def _adam_by_name(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for name, p in trainable_parameters(module):
        state = optimizer.state.get(p)
        if state:  # a parameter that never got a gradient has no moments yet
            out[f"{name}{_SEP}exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            out[f"{name}{_SEP}exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
    return out


def _restore_adam(module: nn.Module, optimizer: torch.optim.Optimizer, path: Path, step: int) -> None:
    moments = load_adam_state(path)
    for name, p in trainable_parameters(module):
        if name in moments:
            m, v = moments[name]
            optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.to(p.device),
                                  "exp_avg_sq": v.to(p.device)}


def _save(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
        save_file(_adam_by_name(module, optimizer), str(tmp / "adam.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def _check_run(out_dir: Path, record: dict[str, Any]) -> None:
    """Refuse to resume a folder written with other settings or another subset."""
    meta = out_dir / "warmup.json"
    if meta.is_file():
        check_settings(out_dir, "warm-up", json.loads(meta.read_text()), record)
    else:
        atomic_write_json(meta, record)


def run_warmup(module: nn.Module, tokenizer: Any, pool: Sequence[InstructionExample],
               settings: WarmupSettings, out_dir: str | Path, *, max_length: int = 256,
               progress: bool = True) -> list[WarmupCheckpoint]:
    """Train ``module``'s LoRA tensors on a random ``settings.percentage`` of ``pool``.

    Writes one checkpoint per epoch under ``out_dir`` (see the module docstring) and resumes
    after the last complete one. Examples without response tokens are left out of training.
    Returns all epochs' checkpoints.
    """
    out_dir = Path(out_dir)
    subset = warmup_subset(pool, settings.percentage, settings.seed)
    encoded = [e for e in (encode(tokenizer, ex, max_length) for ex in subset) if e[1] > 0]
    if not encoded:
        raise FtlabError("no warm-up example has response tokens; check the pool's responses")
    _check_run(out_dir, {**asdict(settings), "max_length": max_length, "subset": [ex.id for ex in subset]})
    per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = per_epoch * settings.epochs
    warm = round(settings.warmup_ratio * total)
    optimizer = torch.optim.AdamW(param_groups(module, settings.weight_decay), lr=settings.lr,
                                  betas=tuple(settings.betas), eps=settings.eps)
    done = list_checkpoints(out_dir)
    if done:
        load_checkpoint_into(module, done[-1])
        _restore_adam(module, optimizer, done[-1].path, done[-1].epoch * per_epoch)
    device = next(p.device for _, p in trainable_parameters(module))
    pad = pad_id(tokenizer)
    module.train()
    bar = tqdm(total=total, initial=len(done) * per_epoch, desc="warm-up", disable=not progress)
    for epoch in range(len(done) + 1, settings.epochs + 1):
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch))
        lrs = []
        for b in range(per_epoch):
            step = (epoch - 1) * per_epoch + b
            lr = settings.lr * lr_factor(settings.schedule, step, total, warm)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = collate([encoded[i] for i in order[b * settings.batch_size:(b + 1) * settings.batch_size]], pad)
            optimizer.zero_grad(set_to_none=True)
            loss = response_loss(module, batch.to(device))
            loss.backward()
            if settings.max_grad_norm is not None:
                nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(module)], settings.max_grad_norm)
            optimizer.step()
            lrs.append(lr)
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        _save(out_dir / f"epoch-{epoch}", module, optimizer,
              {"epoch": epoch, "step": epoch * per_epoch, "mean_lr": sum(lrs) / len(lrs),
               "betas": list(settings.betas), "eps": settings.eps})
    bar.close()
    module.eval()
    return list_checkpoints(out_dir)
