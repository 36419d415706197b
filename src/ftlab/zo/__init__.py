"""Zeroth-order fine-tuning: MeZO (in-place ZO-SGD with the random-seed trick) and its variants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ftlab.config import ZOSettings
from ftlab.errors import FtlabError
from ftlab.zo.fzoo import FZOO
from ftlab.zo.guided import GuidedMeZO
from ftlab.zo.hizoo import HiZOO
from ftlab.zo.lozo import LOZO, LOZOM
from ftlab.zo.mezo import MeZO, ZOStep
from ftlab.zo.offload import OffloadedMeZO
from ftlab.zo.own import LowRankFZOO
from ftlab.zo.svrg import MeZOSVRG
from ftlab.zo.variants import SparseMeZO, ZOAdam, ZOMomentum, ZOSignSGD


@dataclass(frozen=True)
class ZOOptimizer:
    """A zeroth-order optimizer a config names: its class, its own knobs from the settings (beyond
    those every one takes), and its class with offloaded decoder blocks, if it has one."""

    cls: type[MeZO]
    knobs: Callable[[ZOSettings], dict[str, Any]] = field(default=lambda s: {})
    offloaded: type[MeZO] | None = None  # offload=true (ftlab.zo.offload)


ZO_OPTIMIZERS: dict[str, ZOOptimizer] = {
    "mezo": ZOOptimizer(MeZO, offloaded=OffloadedMeZO),
    "zo-momentum": ZOOptimizer(ZOMomentum, lambda s: {"momentum": s.momentum}),
    "zo-adam": ZOOptimizer(ZOAdam, lambda s: {"betas": tuple(s.betas)}),
    "zo-sign": ZOOptimizer(ZOSignSGD),
    "sparse-mezo": ZOOptimizer(SparseMeZO, lambda s: {"sparsity": s.sparsity}),
    "fzoo": ZOOptimizer(FZOO, lambda s: {"batched": s.batched}),
    "hizoo": ZOOptimizer(HiZOO, lambda s: {"hessian_smoothing": s.hessian_smoothing}),
    "lozo": ZOOptimizer(LOZO, lambda s: {"rank": s.rank, "refresh_every": s.refresh_every}),
    "lozo-m": ZOOptimizer(LOZOM, lambda s: {"rank": s.rank, "refresh_every": s.refresh_every,
                                            "momentum": s.momentum}),
    "lowrank-fzoo": ZOOptimizer(LowRankFZOO, lambda s: {"rank": s.rank, "refresh_every": s.refresh_every,
                                                        "momentum": s.momentum, "batched": s.batched}),
    "zo-guided": ZOOptimizer(GuidedMeZO, lambda s: {"pool_size": s.pool_size, "elite_fraction": s.elite_fraction}),
    "mezo-svrg": ZOOptimizer(MeZOSVRG, lambda s: {"svrg_every": s.svrg_every, "svrg_batch": s.svrg_batch,
                                                  "full_lr_scale": s.svrg_full_lr_scale}),
}


def build_zo_optimizer(name: str, param_groups: Iterable, lr: float, settings: ZOSettings, seed: int, *,
                       offload_model: nn.Module | None = None, device: str | torch.device = "cuda") -> MeZO:
    """The zeroth-order optimizer called ``name`` (a key of ``ZO_OPTIMIZERS``) over
    ``param_groups``, configured by ``settings``; ``seed`` seeds its step seeds. With
    ``offload_model`` (the model the parameters belong to), its offloaded form: the model's
    decoder blocks kept in CPU memory and run on ``device`` one at a time."""
    entry = ZO_OPTIMIZERS.get(name)
    if offload_model is not None and (entry is None or entry.offloaded is None):
        offloadable = ", ".join(n for n, e in ZO_OPTIMIZERS.items() if e.offloaded is not None)
        raise FtlabError(f"offload=true is implemented for optimizer={offloadable} (got {name})")
    if entry is None:
        raise FtlabError(f"unknown zeroth-order optimizer {name!r}; choose one of {', '.join(ZO_OPTIMIZERS)}")
    s = settings
    kwargs = {**dict(lr=lr, eps=s.eps, n_perturbations=s.n_perturbations, one_sided=s.one_sided,
                     distribution=s.distribution, generator=s.generator, seed=seed, exact=s.exact,
                     chunk_size=s.chunk_size), **entry.knobs(s)}
    if offload_model is None:
        return entry.cls(param_groups, **kwargs)
    assert entry.offloaded is not None
    return entry.offloaded(param_groups, model=offload_model, device=device, **kwargs)


__all__ = ["FZOO", "GuidedMeZO", "HiZOO", "LOZO", "LOZOM", "LowRankFZOO", "MeZO", "MeZOSVRG", "ZOStep", "ZOSettings",
           "ZOMomentum", "ZOAdam", "ZOSignSGD", "SparseMeZO", "OffloadedMeZO", "ZOOptimizer", "ZO_OPTIMIZERS",
           "build_zo_optimizer"]
