"""Attention masks that per-example gradient code can trace: ready additive 4-D causal + padding
masks (``vmap`` cannot trace transformers' data-dependent mask shortcuts), shared by the eNTK
(:mod:`ftlab.kernel`) and LESS (:mod:`ftlab.select`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ftlab.errors import FtlabError


def row_attention_mask(config: Any, mask: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The additive (1, 1, L, L) causal + padding mask of one row with padding mask ``mask`` (L,).

    transformers builds masks with data-dependent shortcuts (``if mask.all()``) that ``vmap``
    cannot trace; a ready 4D mask is used as given. Models with sliding-window layers
    (``config.layer_types``) get one mask per layer type.
    """
    n = mask.shape[-1]
    q = torch.arange(n, device=mask.device)
    causal = q[None, :] <= q[:, None]
    # A padding query sees only itself: a row with every key masked would give NaN (softmax of
    # all -inf), and NaN leaks into the gradients even where the loss ignores that position.
    allowed = (causal & mask.bool()[None, :]) | (q[None, :] == q[:, None])
    to_additive = lambda a: ((~a).to(dtype) * torch.finfo(dtype).min)[None, None]  # noqa: E731
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return to_additive(allowed)
    window = getattr(config, "sliding_window", None) or n
    masks = {"full_attention": to_additive(allowed),
             "sliding_attention": to_additive(allowed & (q[:, None] - q[None, :] < window))}
    unknown = set(layer_types) - set(masks)
    if unknown:
        raise FtlabError(f"per-example gradients do not support attention layer types {sorted(unknown)}")
    return masks


def batch_attention_mask(config: Any, mask: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """:func:`row_attention_mask` of every row of a ``(B, L)`` padding mask, as ``(B, 1, L, L)``:
    with these masks no padding position turns NaN under eager attention either (a NaN at a
    pad position, times its zero weight, is still NaN in the rows that attend past it)."""
    rows = [row_attention_mask(config, m, dtype) for m in mask]
    if isinstance(rows[0], dict):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return torch.cat(rows)
