"""Zeroth-order fine-tuning: MeZO (in-place ZO-SGD with the random-seed trick) and its variants."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ftlab.config import ZOSettings
from ftlab.errors import FtlabError
from ftlab.zo.mezo import MeZO, ZOStep
from ftlab.zo.variants import SparseMeZO, ZOAdam, ZOMomentum, ZOSignSGD

# Config name -> (class, its own knobs from the settings).
ZO_OPTIMIZERS: dict[str, tuple[type[MeZO], Callable[[ZOSettings], dict[str, Any]]]] = {
    "mezo": (MeZO, lambda s: {}),
    "zo-momentum": (ZOMomentum, lambda s: {"momentum": s.momentum}),
    "zo-adam": (ZOAdam, lambda s: {"betas": tuple(s.betas)}),
    "zo-sign": (ZOSignSGD, lambda s: {}),
    "sparse-mezo": (SparseMeZO, lambda s: {"sparsity": s.sparsity}),
}


def build_zo_optimizer(name: str, param_groups: Iterable, lr: float, settings: ZOSettings, seed: int) -> MeZO:
    """The zeroth-order optimizer called ``name`` (a key of ``ZO_OPTIMIZERS``) over
    ``param_groups``, configured by ``settings``; ``seed`` seeds its step seeds."""
    if name not in ZO_OPTIMIZERS:
        raise FtlabError(f"unknown zeroth-order optimizer {name!r}; choose one of {', '.join(ZO_OPTIMIZERS)}")
    cls, own = ZO_OPTIMIZERS[name]
    s = settings
    return cls(param_groups, lr=lr, eps=s.eps, n_perturbations=s.n_perturbations, one_sided=s.one_sided,
               distribution=s.distribution, generator=s.generator, seed=seed, exact=s.exact,
               chunk_size=s.chunk_size, **own(s))


__all__ = ["MeZO", "ZOStep", "ZOSettings", "ZOMomentum", "ZOAdam", "ZOSignSGD", "SparseMeZO",
           "ZO_OPTIMIZERS", "build_zo_optimizer"]
