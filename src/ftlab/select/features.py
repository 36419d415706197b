"""LESS steps 2-3: per-example LoRA gradient features, Adam-preconditioned or plain (SGD).

For every example, the gradient of its mean response-token loss with respect to the LoRA
tensors is computed for a whole batch at once: for plain LoRA weights from one batched forward
and one backward with the per-example gradient trick (:mod:`ftlab.grads.lora`), for
any other trainable tensors with ``torch.func.vmap(grad(functional_call))`` (each row is an
independent function of the shared parameters, so padding never leaks between examples). The
``"adam"`` feature of a pool example preconditions it with the checkpoint's
AdamW moments as one more (bias-uncorrected) Adam step would:

    m = b1 * exp_avg + (1 - b1) * g,   v = b2 * exp_avg_sq + (1 - b2) * g^2,   feature = m / sqrt(v + eps)

and target examples use the plain gradient (``"sgd"``). Each feature is projected to ``d``
dimensions with :class:`ftlab.grads.projection.Projector` (block by block, never concatenated),
L2-normalised and written to a datastore (:mod:`ftlab.select.datastore`; resumable, and split
over processes under ``torchrun``).
Examples without response tokens (empty response) are reported and skipped, never NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ftlab.collate import pad_id
from ftlab.errors import FtlabError
from ftlab.grads.lora import lora_jacobians, lora_layers
from ftlab.grads.masks import batch_attention_mask, row_attention_mask
from ftlab.grads.projection import Projector
from ftlab.models import trainable_parameters
from ftlab.objectives import ModelBatch, target_logprobs
from ftlab.select.data import InstructionExample, collate, encode
from ftlab.select.datastore import Datastore, write_distributed

GradType = Literal["adam", "sgd"]
GRAD_TYPES = ("adam", "sgd")


class _WithParams:
    """Calls ``module`` with some of its tensors replaced by ``params`` (for torch.func)."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]) -> None:
        self.module, self.params = module, params

    def __call__(self, **kwargs: Any) -> Any:
        return functional_call(self.module, self.params, (), kwargs)


def lora_params(module: nn.Module) -> dict[str, Tensor]:
    """The trainable (LoRA) tensors of ``module`` by name, detached, in parameter order."""
    return {n: p.detach() for n, p in trainable_parameters(module)}


def per_example_grads(module: nn.Module, batch: ModelBatch) -> dict[str, Tensor]:
    """``{name: (B, *shape)}`` gradients of each row's mean response-token NLL w.r.t. the
    trainable tensors of ``module``: by the LoRA per-example gradient trick when they are all
    plain LoRA weights, else with ``vmap(grad(functional_call))``.

    Every row of ``batch`` must have at least one response token (see :func:`collate`).
    """
    names = list(lora_params(module))
    taps = lora_layers(module, names)
    if taps is None:
        return vmap_per_example_grads(module, batch)
    dtype = next(module.parameters()).dtype
    safe = dataclasses.replace(batch, attention_mask=batch_attention_mask(module.config, batch.attention_mask, dtype))
    jac, _ = lora_jacobians(taps, names, batch.attention_mask, lambda: -target_logprobs(module, safe)[:, None])
    return {n: j[:, 0] for n, j in jac.items()}


def vmap_per_example_grads(module: nn.Module, batch: ModelBatch) -> dict[str, Tensor]:
    """:func:`per_example_grads` for any trainable tensors, by ``vmap(grad(functional_call))``."""
    params = lora_params(module)
    config = module.config
    dtype = next(iter(params.values())).dtype

    def row_loss(p: dict[str, Tensor], ids: Tensor, mask: Tensor, pos: Tensor, labels: Tensor) -> Tensor:
        row = ModelBatch(ids[None], row_attention_mask(config, mask, dtype), pos[None], labels[None],
                         n_options=1, gold=None)
        return -target_logprobs(_WithParams(module, p), row)[0]

    return vmap(grad(row_loss), in_dims=(None, 0, 0, 0, 0))(
        params, batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels)


def adam_precondition(g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, betas: Sequence[float],
                      eps: float) -> Tensor:
    """LESS's Adam feature of gradients ``g`` (B, *shape) given one tensor's AdamW moments."""
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * g * g
    return m / torch.sqrt(v + eps)


@dataclass
class AdamState:
    """A checkpoint's AdamW moments by parameter name, with its betas and eps."""

    moments: dict[str, tuple[Tensor, Tensor]]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def feature_blocks(grads: dict[str, Tensor], grad_type: GradType, adam: AdamState | None = None) -> list[Tensor]:
    """One ``(B, n_i)`` feature block per tensor, in ``grads``' order (the projection's order)."""
    if grad_type not in GRAD_TYPES:
        raise FtlabError(f"unknown gradient type {grad_type!r}; use one of {', '.join(GRAD_TYPES)}")
    blocks = []
    for name, g in grads.items():
        if grad_type == "adam":
            if adam is None or name not in adam.moments:
                raise FtlabError(f"Adam features need the AdamW moments of {name!r}; the checkpoint has none "
                                 "for it (was it written by another model or LoRA setting?)")
            m, v = (t.to(g.device, g.dtype) for t in adam.moments[name])
            g = adam_precondition(g, m, v, adam.betas, adam.eps)
        blocks.append(g.reshape(g.shape[0], -1))
    return blocks


def normalise(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero instead of becoming NaN)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def encode_all(tokenizer: Any, examples: Sequence[InstructionExample], max_length: int,
               ) -> tuple[list[tuple[str, tuple[list[int], int]]], list[str]]:
    """``([(id, encoded)], skipped ids)``: the examples with response tokens, sorted by length
    (so batches hold little padding; ties keep pool order), and the ids of those without."""
    kept, skipped = [], []
    for ex in examples:
        enc = encode(tokenizer, ex, max_length)
        (kept.append((ex.id, enc)) if enc[1] > 0 else skipped.append(ex.id))
    return sorted(kept, key=lambda item: len(item[1][0])), skipped


@dataclass
class FeatureResult:
    """A feature pass's datastore and the ids it skipped because they have no response tokens."""

    store: Datastore
    skipped: list[str] = field(default_factory=list)


def collect_features(module: nn.Module, tokenizer: Any, examples: Sequence[InstructionExample], path: str | Path,
                     *, grad_type: GradType, projector: Projector, model_name: str, checkpoint: str,
                     adam: AdamState | None = None, batch_size: int = 8, max_length: int = 256,
                     dtype: str = "float16", extra: dict[str, Any] | None = None, shard_rows: int = 64,
                     progress: bool = True) -> FeatureResult:
    """Compute, project, L2-normalise and store the features of ``examples`` in datastore ``path``.

    Rows are stored shortest example first (the order is a pure function of the examples, so
    every checkpoint's store lists the same ids in the same order). Resumable: a rerun skips
    the complete shards (``shard_rows`` rows each); under ``torchrun`` the examples are split
    over the processes and merged (see :func:`ftlab.select.datastore.write_distributed`).
    """
    kept, skipped = encode_all(tokenizer, examples, max_length)
    if not kept:
        raise FtlabError(f"none of the {len(examples)} examples has response tokens; nothing to compute")
    device = next(p.device for _, p in trainable_parameters(module))
    pad = pad_id(tokenizer)
    module.eval()

    def compute(indices: list[int]) -> Tensor:
        batch = collate([kept[i][1] for i in indices], pad).to(device)
        blocks = feature_blocks(per_example_grads(module, batch), grad_type, adam)
        return normalise(projector.project_blocks(blocks)).cpu()

    store = write_distributed(path, [i for i, _ in kept], compute, batch_size=batch_size, device=str(device),
                              progress=progress, shard_rows=shard_rows, model=model_name, checkpoint=checkpoint,
                              grad_type=grad_type, dim=projector.spec.dim_out, dtype=dtype,
                              projection=projector.spec, extra=dict(extra or {}))
    return FeatureResult(store, skipped)
