"""Per-example Jacobians of the kernel's outputs, a chunk of examples at a time: the LoRA
per-example gradient trick (:mod:`ftlab.grads.lora`) or ``vmap(jacrev)``; and the parameter blocks
an exact kernel walks so one block's training Jacobian fits its memory budget."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor
from torch.func import jacrev, vmap

from ftlab.errors import FtlabError
from ftlab.grads.lora import lora_jacobians, lora_layers
from ftlab.kernel.outputs import OutputFunction, eager_attention
from ftlab.objectives import ModelBatch


def jacobians_and_outputs(fn: OutputFunction, params: dict[str, Tensor], batch: ModelBatch,
                          ) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example Jacobians and the outputs ``f`` ``(B, O)`` from the same forward pass: by
    the LoRA per-example gradient trick when every parameter is a plain LoRA weight
    (:mod:`ftlab.grads.lora`: the model's own attention, no vmap batching rules), else
    by ``vmap(jacrev)``."""
    names = list(params)
    taps = lora_layers(fn.module, names)
    if taps is not None:
        return lora_jacobians(taps, names, batch.attention_mask, lambda: fn.direct(batch))
    with eager_attention(fn.module):
        return vmap_jacobians_and_outputs(fn, params, batch)


def vmap_jacobians_and_outputs(fn: OutputFunction, params: dict[str, Tensor], batch: ModelBatch,
                               ) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example Jacobians of any parameters by ``vmap(jacrev(functional_call))`` (call it
    under :func:`eager_attention`)."""
    def value_twice(p: dict[str, Tensor], ids: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        out = fn.row(p, ids, mask, pos)
        return out, out
    return vmap(jacrev(value_twice, has_aux=True), in_dims=(None, 0, 0, 0))(
        params, batch.input_ids, batch.attention_mask, batch.position_ids)


def flat(jac: dict[str, Tensor], names: Sequence[str]) -> list[Tensor]:
    """Jacobian blocks as ``(B * O, n_i)`` matrices, one per name (the projection's order)."""
    return [jac[n].reshape(jac[n].shape[0] * jac[n].shape[1], -1) for n in names]


def parameter_blocks(params: dict[str, Tensor], rows: int, max_mb: float) -> list[list[str]]:
    """Consecutive groups of parameter names whose ``rows x numel`` float32 Jacobian fits ``max_mb``."""
    budget = max_mb * 2**20 / (4 * rows)
    blocks: list[list[str]] = [[]]
    size = 0
    for name, p in params.items():
        if p.numel() > budget:
            raise FtlabError(f"the exact kernel needs {rows * p.numel() * 4 / 2**20:.3g} MB for {name!r} "
                             f"(more than max_block_mb={max_mb:g}); raise max_block_mb or use a projection "
                             "(projection_dim=8192)")
        if size + p.numel() > budget and blocks[-1]:
            blocks.append([])
            size = 0
        blocks[-1].append(name)
        size += p.numel()
    return blocks
