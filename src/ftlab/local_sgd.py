"""Local SGD for first-order data-parallel training, on PyTorch's own machinery.

Synchronous data parallelism (DDP) all-reduces the gradients at every step. Local SGD lets every
rank take ``H`` steps on its own shards of the batches, then averages the ranks' weights (one
all-reduce of the trainable tensors); the optimizer state (momentum, Adam moments) stays local.
*Post-local* SGD (Lin et al., 2020) runs synchronously until a switch step, then locally.

Here that is PyTorch's post-local SGD communication hook on the DDP module
(``PostLocalSGDState`` + ``post_localSGD_hook``: gradients all-reduced until ``switch_step``,
not at all after it) and :class:`LocalSGDAverager`, a ``torch`` ``ModelAverager`` whose period
follows a schedule (``PeriodicModelAverager`` has a fixed one):

- ``constant``: ``H`` local steps per round;
- ``quadratic``, the quadratic synchronization rule (QSR; Gu, Lyu, Arora, Zhang, Huang, ICLR
  2024, arXiv 2310.14423): at the start of round ``s`` (step ``t``),
  ``H(s) = max(H_base, floor((alpha / lr_t) ** 2))``, so rounds grow as the lr decays.

A round never runs past the last step: the ranks always end averaged. Communication rounds
counted: one per synchronous step (its gradient all-reduce) and one per average.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from ftlab.config import LocalSGDSettings
from ftlab.errors import FtlabError


def quadratic_period(lr: float, alpha: float, h_base: int) -> int:
    """The QSR's period for a round starting at learning rate ``lr``:
    ``max(h_base, floor((alpha / lr) ** 2))`` (a huge number once ``lr`` is 0)."""
    if lr <= 0:
        return 2 ** 62
    return max(h_base, math.floor((alpha / lr) ** 2))


def period_for(settings: LocalSGDSettings, lr: float) -> int:
    """H for a round starting at learning rate ``lr`` under ``settings``."""
    if settings.period is None or settings.period < 1:
        raise FtlabError(f"local_sgd.period must be >= 1 (H, the local steps between averages; got {settings.period})")
    if settings.rule == "quadratic":
        if settings.alpha is None or settings.alpha <= 0:
            raise FtlabError(f"local_sgd.rule=quadratic needs local_sgd.alpha > 0 (got {settings.alpha})")
        return quadratic_period(lr, settings.alpha, settings.period)
    return settings.period


class LocalSGDAverager(ModelAverager):
    """Averages the ranks' parameters after each round of local steps, the round's length
    chosen by :func:`period_for` at its first step. Call :meth:`after_step` once after every
    optimizer step (also before ``switch_step``: those steps are counted, never averaged).

    ``total_steps`` ends the last round early, so training finishes averaged. The counters
    (:meth:`state_dict`) are part of a run's checkpoint."""

    def __init__(self, settings: LocalSGDSettings, total_steps: int, process_group: Any = None,
                 world: int | None = None) -> None:
        import torch.distributed as dist

        # ModelAverager's constructor reads the default group; a single process has none.
        self.process_group = process_group if process_group is not None else (
            dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        self.step = 0
        self.world = world if world is not None else (dist.get_world_size() if self.process_group else 1)
        self.settings = settings
        self.total_steps = total_steps
        self.round_start: int | None = None  # first step of the current local round
        self.period: int | None = None  # its H
        self.averages = 0  # parameter averages done (communication rounds of Local SGD)
        self.sync_steps = 0  # synchronous steps done (one gradient all-reduce each)

    @property
    def rounds(self) -> int:
        """Communication rounds so far: synchronous steps plus averages."""
        return self.sync_steps + self.averages

    @property
    def synced(self) -> bool:
        """Whether every rank holds the same weights now (no local round under way)."""
        return self.round_start is None or self.step == self.round_start

    def average_parameters(self, params: Iterable[nn.Parameter]) -> None:
        """Average ``params`` over the ranks (a no-op in one process), in place."""
        params = [p for p in params]
        if self.world > 1 and params:
            from torch.distributed.algorithms.model_averaging.utils import average_parameters

            average_parameters(iter(params), self.process_group)

    def after_step(self, params: Iterable[nn.Parameter], lr_next: float) -> bool:
        """Count the step just taken; average ``params`` if it ends a round. ``lr_next`` is the
        learning rate of the next step (where a new round would start). Returns whether it averaged."""
        done = self.step + 1  # steps finished
        self.step = done
        if done <= self.settings.switch_step:
            self.sync_steps += 1
            if done == self.settings.switch_step:
                self._start_round(done, lr_next)
            return False
        if self.round_start is None:  # switch_step == 0: the first round starts at step 0
            raise FtlabError("LocalSGDAverager.start(lr) must be called before the first local step")
        if done - self.round_start < self.period and done < self.total_steps:
            return False
        self.average_parameters(params)
        self.averages += 1
        if done < self.total_steps:
            self._start_round(done, lr_next)
        else:  # the end: no next round (its H, at lr 0 under a decaying schedule, would be meaningless)
            self.round_start = done
        return True

    def start(self, lr: float) -> None:
        """Begin counting at step 0 with learning rate ``lr`` (call once, before training)."""
        if self.settings.switch_step == 0:
            self._start_round(0, lr)

    def _start_round(self, step: int, lr: float) -> None:
        self.round_start, self.period = step, period_for(self.settings, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "round_start": self.round_start, "period": self.period,
                "averages": self.averages, "sync_steps": self.sync_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "round_start", "period", "averages", "sync_steps"):
            setattr(self, key, state[key])


def register_post_local_hook(ddp: nn.Module, settings: LocalSGDSettings, step: int) -> Any:
    """PyTorch's post-local SGD hook on the DDP module: gradients all-reduced over every rank
    before ``settings.switch_step``, not communicated after it (``post_local_gradient_allreduce
    =False``: every rank is its own group). ``step`` is where training (re)starts."""
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=settings.switch_step,
                              post_local_gradient_allreduce=False)
    state.iter = min(step, settings.switch_step)  # a resumed run continues the hook's count
    ddp.register_comm_hook(state, post_localSGD_hook)
    return state


@torch.no_grad()
def snapshot(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """Copies of ``params`` (to restore a rank's local weights after evaluating the average)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: Iterable[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.data = s
