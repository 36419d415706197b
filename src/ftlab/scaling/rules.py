"""Batch-size scaling rules: how to change an optimizer's hyperparameters when the batch size is
multiplied by ``kappa`` so that training follows the same trajectory per sample seen.

Each rule keeps the optimizer's SDE approximation unchanged (so curves against *samples seen*
coincide, to first order):

- **SGD** (linear rule; Goyal et al. 2017, justified by the SDE of Li, Malladi, Arora 2021):
  ``lr -> kappa lr``. One step of batch ``kappa B`` covers ``kappa`` steps of SDE time and its
  gradient noise covariance is ``kappa`` times smaller, so drift and noise per unit time agree.
- **SGD with momentum** (Wang et al. 2023): at small lr, heavy ball with ``(lr, beta)`` behaves like
  SGD at the effective lr ``lr / (1 - beta)``. We apply the linear rule to that effective lr and keep
  ``beta`` (the momentum window, ``1 / (1 - beta)`` steps, is left alone): ``lr -> kappa lr``.
- **RMSprop, Adam, AdamW** (square-root rule, Malladi, Lyu, Panigrahi, Arora 2022):
  ``lr -> sqrt(kappa) lr``, ``1 - beta -> kappa (1 - beta)`` for each beta (RMSprop's smoothing
  constant is its beta2), ``eps -> eps / sqrt(kappa)``. Their SDE runs at time ``lr**2`` per step;
  decoupled weight decay ``lr * wd`` per step must then scale with ``kappa`` too, so
  ``wd -> sqrt(kappa) wd``.
- **MeZO (ZO-SGD)**: linear, as SGD, plus ``n_perturbations -> kappa n_perturbations``. ZO-SGD is SGD
  on an unbiased gradient estimate whose covariance has a minibatch part (~ 1/B) and a
  perturbation part (~ 1/n, dimension-sized, *not* reduced by a larger batch). Scaling both B and
  n by ``kappa`` shrinks the whole covariance ``kappa``-fold, as the linear rule needs; scaling B
  alone would leave the (dominant) perturbation noise per step unchanged and so multiply it by
  ``kappa`` per unit time at ``kappa lr``.

``kappa`` then ``1 / kappa`` returns the original hyperparameters (every rule is a group action).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ftlab.config import TrainConfig
from ftlab.errors import FtlabError

OPTIMIZERS: tuple[str, ...] = ("sgd", "rmsprop", "adam", "adamw", "mezo")


@dataclass
class OptimizerHParams:
    """The hyperparameters a batch-size rule touches. ``betas``: Adam's ``(beta1, beta2)``;
    RMSprop uses ``betas[1]`` as its smoothing constant (torch's ``alpha``) and ignores ``betas[0]``."""

    optimizer: str = "adamw"  # sgd | rmsprop | adam | adamw | mezo
    lr: float = 1e-3
    batch_size: int = 8
    momentum: float = 0.0  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw, rmsprop
    eps: float = 1e-8  # adam, adamw, rmsprop
    weight_decay: float = 0.0
    n_perturbations: int = 1  # mezo


@dataclass
class ScaledHParams:
    """The result of a rule: the new hyperparameters and a one-line explanation of the rule."""

    rule: str
    kappa: float
    hparams: OptimizerHParams
    explanation: str


def scale(h: OptimizerHParams, kappa: float) -> ScaledHParams:
    """The hyperparameters for batch size ``kappa * h.batch_size`` under ``h.optimizer``'s rule.

    Raises :class:`FtlabError` for ``kappa <= 0``, an unknown optimizer, a batch size or number of
    perturbations that would not be a whole number, or a beta that leaves ``[0, 1)``."""
    if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa > 0):
        raise FtlabError(f"kappa must be a positive number (the batch-size factor), got {kappa!r}")
    if h.optimizer not in OPTIMIZERS:
        raise FtlabError(f"no scaling rule for optimizer {h.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    _check_betas(h, "given")
    batch = _whole(h.batch_size * kappa, "batch_size", h.batch_size, kappa)
    if h.optimizer == "sgd":
        return _linear_sgd(h, kappa, batch)
    if h.optimizer == "mezo":
        n = _whole(h.n_perturbations * kappa, "n_perturbations", h.n_perturbations, kappa)
        new = dataclasses.replace(h, lr=h.lr * kappa, batch_size=batch, n_perturbations=n)
        return ScaledHParams("linear (ZO-SGD)", kappa, new,
                             f"ZO-SGD is SGD on an estimate whose noise falls as 1/(batch * perturbations): "
                             f"scale both by {kappa:g} and use the linear rule, lr x {kappa:g}")
    return _square_root(h, kappa, batch)


def _linear_sgd(h: OptimizerHParams, kappa: float, batch: int) -> ScaledHParams:
    new = dataclasses.replace(h, lr=h.lr * kappa, batch_size=batch)
    if h.momentum == 0:
        return ScaledHParams("linear", kappa, new,
                             f"SGD's SDE is unchanged when lr and batch grow together: lr x {kappa:g}")
    return ScaledHParams("linear (momentum)", kappa, new,
                         f"SGD with momentum {h.momentum:g} ~ SGD at lr/(1-momentum) (Wang et al.): linear rule "
                         f"on that effective lr with momentum kept, lr x {kappa:g}")


def _square_root(h: OptimizerHParams, kappa: float, batch: int) -> ScaledHParams:
    root = math.sqrt(kappa)
    betas = [1 - kappa * (1 - b) for b in h.betas]
    if h.optimizer == "rmsprop":
        betas[0] = h.betas[0]  # RMSprop has no first moment
    new = dataclasses.replace(h, lr=h.lr * root, batch_size=batch, betas=betas, eps=h.eps / root,
                              weight_decay=h.weight_decay * root)
    _check_betas(new, "after scaling", kappa, h.betas)
    return ScaledHParams("square root", kappa, new,
                         f"{h.optimizer}'s SDE (Malladi et al. 2022) is unchanged under lr x sqrt({kappa:g}), "
                         f"1-beta x {kappa:g}, eps / sqrt({kappa:g}), weight decay x sqrt({kappa:g})")


def _whole(value: float, name: str, old: int, kappa: float) -> int:
    """``value`` as an int, or a clear error if ``old * kappa`` is not (close to) a whole number."""
    rounded = round(value)
    if rounded < 1 or abs(value - rounded) > 1e-9 * max(1.0, abs(value)):
        raise FtlabError(f"{name} {old} x kappa {kappa:g} = {value:g} is not a whole number >= 1; "
                         f"pick kappa so that it is")
    return rounded


def _check_betas(h: OptimizerHParams, when: str, kappa: float | None = None,
                 old: list[float] | None = None) -> None:
    """Every beta the optimizer uses must lie in [0, 1); after scaling, say which kappa would fit."""
    checks = [("momentum", h.momentum)] if h.optimizer == "sgd" else []
    if h.optimizer in ("adam", "adamw", "rmsprop"):
        if len(h.betas) != 2:
            raise FtlabError(f"betas must be two numbers [beta1, beta2], got {h.betas!r}")
        checks += [(f"beta{i + 1}", b) for i, b in enumerate(h.betas) if h.optimizer != "rmsprop" or i == 1]
    for name, value in checks:
        if 0 <= value < 1:
            continue
        if kappa is None:
            raise FtlabError(f"{name} = {value:g} ({when}) must lie in [0, 1)")
        one_minus = 1 - old[int(name[-1]) - 1]
        raise FtlabError(f"{name} = {value:g} after scaling (1-{name} x kappa = {one_minus:g} x {kappa:g} = "
                         f"{1 - value:g} > 1): the square-root rule needs kappa < {1 / one_minus:g}; "
                         f"use a smaller kappa or a {name} closer to 1")


def from_train_config(cfg: TrainConfig) -> OptimizerHParams:
    """The rule-relevant hyperparameters of a training config (``adamw``, ``sgd`` or ``mezo``)."""
    if cfg.optimizer not in ("adamw", "sgd", "mezo"):
        raise FtlabError(f"no scaling rule for optimizer {cfg.optimizer!r} in a training config; "
                         "use adamw, sgd or mezo")
    return OptimizerHParams(optimizer=cfg.optimizer, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                            betas=list(cfg.adam_betas or [0.9, 0.999]),
                            eps=1e-8 if cfg.adam_eps is None else cfg.adam_eps,
                            weight_decay=cfg.weight_decay, n_perturbations=cfg.zo.n_perturbations)


def to_train_config(cfg: TrainConfig, h: OptimizerHParams) -> TrainConfig:
    """``cfg`` with the hyperparameters ``h`` (as produced by :func:`scale`) written into it."""
    new = dataclasses.replace(cfg, lr=h.lr, batch_size=h.batch_size, weight_decay=h.weight_decay)
    if cfg.optimizer == "adamw":
        return dataclasses.replace(new, adam_betas=list(h.betas), adam_eps=h.eps)
    if cfg.optimizer == "sgd":
        return dataclasses.replace(new, momentum=h.momentum)
    return dataclasses.replace(new, zo=dataclasses.replace(cfg.zo, n_perturbations=h.n_perturbations))
