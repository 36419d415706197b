"""Data-parallel training on ``torch.distributed``, as launched by ``torchrun``.

Zeroth-order optimizers (MeZO): every rank holds the whole model, draws the same seeds,
evaluates the loss on its own shard of the step's global batch, and the optimizer averages the
loss differences over ranks with one scalar all-reduce a step (see :mod:`ftlab.zo.mezo`), so all
ranks apply the same update and stay identical. How a run uses these (DDP, Local SGD, FSDP2
through :func:`shard_model`, ...) is a strategy of :mod:`ftlab.parallel`.

Every function here is a no-op (or answers as a single process does) when the process was not
started by a launcher, so the same training code runs with and without ``torchrun``.
"""

from __future__ import annotations

import gc
import math
import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

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


def shutdown(wait: bool = True) -> None:
    """Leave the process group, if one was joined (NCCL asks for it before the process exits).

    With ``wait`` every rank first waits for the others, so no collective is in flight when the
    group goes (pass False on an error path, where another rank may never arrive). Garbage is
    collected before and after, so the sharded modules, their pending work and the backend's
    worker threads are freed while the interpreter is alive: freed at interpreter exit instead,
    gloo can abort a finished rank ("terminate called without an active exception").
    """
    if not _initialised():
        return
    gc.collect()
    if wait:
        barrier()
    dist.destroy_process_group()
    gc.collect()


# -- FSDP2: every parameter sharded over the ranks (zeroth-order training of models larger than
# one device; see ftlab.zo.directions for how each rank makes z for its own shard) ------------

def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of ``model``: its ``nn.ModuleList`` holding the most
    parameters (``model.layers`` of a Llama, ``transformer.h`` of a GPT-2, through peft)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise FtlabError(f"{type(model).__name__} has no list of transformer blocks to shard or offload")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard_model(model: nn.Module, device: str) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks of the process group: each transformer
    block is one ``fully_shard`` unit (gathered for its forward, resharded after), the rest
    (embeddings, final norm, head) the root unit. Every parameter then is a ``DTensor`` sharded
    along dim 0; a rank holds 1/world of each."""
    if not _initialised():
        raise FtlabError("fsdp=true shards the model over torchrun processes: launch with "
                         "torchrun --nproc_per_node N -m ftlab.cli train ... fsdp=true")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    # reshard_after_forward given explicitly: FSDP2 otherwise keeps the root's parameters
    # gathered after its forward (for a backward), and MeZO's next forward, run after the
    # shards were perturbed, would not gather them again.
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def local_part(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(local tensor, first global flat index, global numel)`` of a parameter: the whole tensor,
    or the shard of a ``DTensor`` sharded along dim 0 over a 1-D mesh (FSDP2), whose entries are
    the contiguous global range ``[start, start + local.numel())``."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return p, 0, p.numel()
    if not isinstance(p, DTensor):
        return p, 0, p.numel()
    placements = p.placements
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise FtlabError(f"sharded MeZO handles parameters sharded along dim 0 over one mesh dimension "
                         f"(FSDP2's default); got placements {placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    local = p._local_tensor
    row = math.prod(p.shape[1:]) if p.ndim > 1 else 1
    return local, int(offset[0]) * row, p.numel()


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: gathered from every rank for a sharded one (a
    collective: every rank must call it), the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


@torch.no_grad()
def copy_full_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter: for a sharded one, only this rank's rows."""
    local, start, _ = local_part(p)
    local.copy_(full.reshape(-1)[start:start + local.numel()].view_as(local).to(local.device, local.dtype))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere); ``[obj]`` in one process."""
    if not _initialised():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` in one process."""
    if not _initialised():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_evenly(items: list[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous part of ``items`` cut into ``world`` parts whose sizes differ by
    at most one (for evaluation, where the number of examples need not divide)."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (rank < extra)]
