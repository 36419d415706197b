"""Optimizers of the training loop: the parameter groups (no decay on biases and norms), the
optimizer a config names (AdamW, SGD, or a zeroth-order one from :mod:`ftlab.zo`), the lr
schedule, and the one test of whether an optimizer is zeroth-order (it then gets a forward-only
closure, no gradients, eval-mode forwards, no autocast)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ftlab.config import TrainConfig
from ftlab.distributed import rank_device
from ftlab.errors import FtlabError
from ftlab.models import trainable_parameters
from ftlab.zo import ZO_OPTIMIZERS, build_zo_optimizer


def is_zeroth_order(optimizer: Any) -> bool:
    """Whether ``optimizer`` (an instance, or a config's optimizer name) is zeroth-order: MeZO and
    its variants flag themselves with ``zeroth_order = True``."""
    if isinstance(optimizer, str):
        return optimizer in ZO_OPTIMIZERS
    return bool(getattr(optimizer, "zeroth_order", False))


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation weights (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or "bias" in name or "norm" in name.lower()


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed and a non-decayed group."""
    named = trainable_parameters(module)
    if not named:
        raise FtlabError("nothing to train: the model has no trainable parameters")
    return [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]


def build_optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over the trainable parameters of ``module``; with
    ``cfg.offload``, its offloaded form (:mod:`ftlab.zo.offload`: the decoder blocks stay in CPU
    memory and are brought to the rank's device one at a time, the +eps and -eps forwards in
    lockstep)."""
    groups = param_groups(module, cfg.weight_decay)
    if cfg.offload:
        return build_zo_optimizer(cfg.optimizer, groups, cfg.lr, cfg.zo, cfg.seed_of("zo"), offload_model=module,
                                  device=rank_device(cfg.device))
    if cfg.optimizer == "adamw":
        betas = tuple(cfg.adam_betas) if cfg.adam_betas is not None else (0.9, 0.999)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas,
                                 eps=1e-8 if cfg.adam_eps is None else cfg.adam_eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer in ZO_OPTIMIZERS:
        return build_zo_optimizer(cfg.optimizer, groups, cfg.lr, cfg.zo, cfg.seed_of("zo"))
    raise FtlabError(f"unknown optimizer {cfg.optimizer!r}; choose one of adamw, sgd, {', '.join(ZO_OPTIMIZERS)}")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up, then constant/linear/cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise FtlabError(f"unknown lr schedule {schedule!r}; choose constant, linear or cosine")
