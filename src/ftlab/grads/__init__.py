"""The gradient machinery the paper packages share: per-example LoRA Jacobians by hooks
(:mod:`~ftlab.grads.lora`), seeded device-independent random projections
(:mod:`~ftlab.grads.projection`) and traceable attention masks (:mod:`~ftlab.grads.masks`).
Used by the eNTK (:mod:`ftlab.kernel`) and LESS (:mod:`ftlab.select`), which never import each other."""

from ftlab.grads.lora import lora_jacobians, lora_layers
from ftlab.grads.masks import batch_attention_mask, row_attention_mask
from ftlab.grads.projection import ProjectionSpec, Projector, jl_tolerance

__all__ = ["ProjectionSpec", "Projector", "batch_attention_mask", "jl_tolerance", "lora_jacobians", "lora_layers",
           "row_attention_mask"]
