"""Data-parallel training on ``torch.distributed``, as launched by ``torchrun``.

Only zeroth-order optimizers (MeZO) run data parallel: every rank holds the whole model, draws
the same seeds, evaluates the loss on its own shard of the step's global batch, and the
optimizer averages the loss differences over ranks with one scalar all-reduce a step (see
:mod:`ftlab.zo.mezo`), so all ranks apply the same update and stay identical.

Every function here is a no-op (or answers as a single process does) when the process was not
started by a launcher, so the same training code runs with and without ``torchrun``.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

from ftlab.errors import FtlabError

T = TypeVar("T")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_world_size() -> int:
    # torchrun sets WORLD_SIZE, RANK and LOCAL_RANK for every worker it starts.
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[int, int]:
    """Join the process group ``torchrun`` set up (through its environment variables) and
    return ``(rank, world_size)``: ``(0, 1)`` in a plain process.

    The backend is NCCL for a ``cuda`` device and gloo otherwise. A group initialised
    beforehand (by a test or an embedding program) is used as it is.
    """
    if _initialised():
        return dist.get_rank(), dist.get_world_size()
    if _env_world_size() <= 1:
        return 0, 1
    cuda = device.startswith("cuda")
    if cuda:
        # Before the group exists, so NCCL binds this process to its own GPU, not GPU 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for a ``cuda`` device when
    launched with several processes (one GPU each; pick GPUs with ``CUDA_VISIBLE_DEVICES``),
    ``device`` itself otherwise."""
    if device.startswith("cuda") and _env_world_size() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0, or the only process).

    Before the group is initialised the launcher's ``RANK`` answers, so it can already guard
    work done ahead of training (the CLI's ``--overwrite``)."""
    if _initialised():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process): a rank that reads a file
    rank 0 writes calls it between the write and the read."""
    if not _initialised():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shard(items: list[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous slice of ``items`` (the step's global batch) when split into
    ``world`` equal parts. Equal parts matter: the mean of the ranks' mean losses is then the
    mean loss of the global batch.

    Raises:
        FtlabError: ``len(items)`` is not a multiple of ``world``.
    """
    if len(items) % world:
        raise FtlabError(f"batch_size={len(items)} (the global batch) cannot be split evenly "
                         f"over {world} processes; use a multiple of {world}")
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


def shutdown() -> None:
    """Leave the process group, if one was joined (NCCL asks for it before the process exits)."""
    if _initialised():
        dist.destroy_process_group()
