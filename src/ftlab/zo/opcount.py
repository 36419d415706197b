"""Count the operations a zeroth-order step issues outside its forwards (what makes a GPU step
launch-bound): every ATen call is seen by a ``TorchDispatchMode``; views (``as_strided``,
``view``, ``slice``...) only make metadata, every other call is a kernel launch on a GPU."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` then ``c.views``, ``c.compute`` (launches) and ``c.by_op``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.views = self.compute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.by_op[str(func.overloadpacket.__name__)] += 1
        if func.is_view:
            self.views += 1
        else:
            self.compute += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(optimizer: torch.optim.Optimizer, closure: Callable[[], object] | None = None) -> OpCounter:
    """The ATen operations of one ``optimizer.step`` with a closure that itself issues none
    (a constant loss: the forwards are not counted, only the optimizer's own work)."""
    with OpCounter() as counter:
        optimizer.step(closure or (lambda: 1.0))
    return counter
