"""What the eNTK differentiates: the parameter subset, the readout ``R`` and the label-word output
function ``f(x) = R^T z(x)`` of one row or a batch (see :mod:`ftlab.kernel.entk`)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ftlab.errors import FtlabError
from ftlab.grads.masks import batch_attention_mask, row_attention_mask
from ftlab.models.head import output_head
from ftlab.objectives import Encoder, ModelBatch
from ftlab.tasks.base import Example

OUTPUTS = ("logits", "contrast")


def select_parameters(module: nn.Module, which: str) -> dict[str, Tensor]:
    """The parameters the kernel differentiates, by name (detached), in module order."""
    named = list(module.named_parameters())
    if which == "all":
        picked = named
    elif which == "trainable":
        picked = [(n, p) for n, p in named if p.requires_grad]
    elif which == "lora":
        picked = [(n, p) for n, p in named if ".lora_A." in n or ".lora_B." in n]
        if not picked:
            raise FtlabError("params='lora' but the model has no LoRA matrices; wrap it with "
                             "ftlab.models.apply_lora first (or choose params='all' or 're:<regex>')")
    elif which.startswith("re:"):
        pattern = re.compile(which[3:])
        picked = [(n, p) for n, p in named if pattern.search(n)]
    else:
        raise FtlabError(f"kernel params must be 'all', 'trainable', 'lora' or 're:<regex>', got {which!r}")
    if not picked:
        raise FtlabError(f"kernel params {which!r} match no parameter of the model "
                         f"(names look like {named[0][0]!r})")
    return {n: p.detach() for n, p in picked}


def readout_matrix(n_classes: int, output: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """``R`` (``C x O``): identity (``"logits"``) or an orthonormal sum-zero (Helmert) basis."""
    if output == "logits":
        return torch.eye(n_classes, dtype=dtype)
    if output != "contrast":
        raise FtlabError(f"kernel output must be one of {OUTPUTS}, got {output!r}")
    cols = []
    for k in range(1, n_classes):  # k-th Helmert contrast: mean of the first k minus class k
        v = torch.zeros(n_classes, dtype=dtype)
        v[:k], v[k] = 1.0, -float(k)
        cols.append(-v / v.norm())  # sign: class k's logit counts positively
    return torch.stack(cols, 1)


def label_word_ids(encoder: Encoder) -> list[int]:
    """The single-token ids of the label words; the kernel needs one logit per class."""
    if not encoder.option_ids:
        raise FtlabError(f"task {encoder.spec.name!r} has no label words; the kernel view needs a "
                         "classification task")
    if not encoder.single_token:
        multi = [o for o, ids in zip(encoder.spec.options, encoder.option_ids) if len(ids) > 1]
        raise FtlabError(f"label words {multi} are several tokens long; the eNTK needs single-token label "
                         "words (override the task's options, e.g. ' great,terrible')")
    return [ids[0] for ids in encoder.option_ids]


class OutputFunction:
    """``f(params, ids, mask, pos) -> (O,)`` for one unpadded-or-left-padded row, with
    ``params`` replacing the matching tensors of ``module`` (the rest stay fixed)."""

    def __init__(self, module: nn.Module, label_ids: Sequence[int], readout: Tensor) -> None:
        self.module = module
        self.label_ids = torch.tensor(list(label_ids))
        self.readout = readout
        self.fixed = {n: p.detach() for n, p in module.named_parameters()}
        self.config = getattr(module, "config", None)

    def logits(self, params: dict[str, Tensor], ids: Tensor, masks: Any, pos: Tensor) -> Tensor:
        """Label-word logits ``z`` ``(B, C)`` of a batch ``(B, L)`` given ready 4-D masks."""
        with output_head(self.module, self.label_ids.tolist()) as narrowed:
            out = functional_call(self.module, {**self.fixed, **params}, (),
                                  dict(input_ids=ids, attention_mask=masks, position_ids=pos,
                                       logits_to_keep=1, use_cache=False))
        return self._label_logits(out.logits, narrowed)

    def _label_logits(self, logits: Tensor, narrowed: bool) -> Tensor:
        """``z`` ``(B, C)`` from the last position of logits over the label words (``narrowed``,
        see :func:`ftlab.models.head.output_head`) or over the vocabulary."""
        return logits[:, -1] if narrowed else logits[:, -1, self.label_ids.to(logits.device)]

    def row_masks(self, mask: Tensor) -> Tensor | dict[str, Tensor]:
        """The additive ``(1, 1, L, L)`` mask(s) of one row with padding mask ``mask`` ``(L,)``:
        ready 4-D masks avoid transformers' data-dependent shortcuts that vmap cannot trace
        (:func:`ftlab.grads.masks.row_attention_mask`; a pad position sees itself, so it
        stays finite under eager attention)."""
        dtype = next(iter(self.fixed.values())).dtype
        return row_attention_mask(self.config, mask, dtype)

    def batch_masks(self, batch: ModelBatch) -> Tensor | dict[str, Tensor]:
        """The 4-D masks of every row of a left-padded batch (see :meth:`row_masks`)."""
        dtype = next(iter(self.fixed.values())).dtype
        return batch_attention_mask(self.config, batch.attention_mask, dtype)

    def batch(self, params: dict[str, Tensor], batch: ModelBatch) -> Tensor:
        """``f`` of every row of a left-padded batch, ``(B, O)``."""
        z = self.logits(params, batch.input_ids, self.batch_masks(batch), batch.position_ids)
        return z @ self.readout.to(z.device, z.dtype)

    def direct(self, batch: ModelBatch) -> Tensor:
        """``f`` ``(B, O)`` of a left-padded batch by a plain call of the module (its own
        attention implementation and current weights; the masks of :meth:`batch_masks`)."""
        with output_head(self.module, self.label_ids.tolist()) as narrowed:
            logits = self.module(input_ids=batch.input_ids, attention_mask=self.batch_masks(batch),
                                 position_ids=batch.position_ids, logits_to_keep=1, use_cache=False).logits
        z = self._label_logits(logits, narrowed)
        return z @ self.readout.to(z.device, z.dtype)

    def row(self, params: dict[str, Tensor], ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        """``f`` of one row ``(L,)``, ``(O,)`` (vmap-able)."""
        z = self.logits(params, ids[None], self.row_masks(mask), pos[None])[0]
        return z @ self.readout.to(z.device, z.dtype)


@contextmanager
def eager_attention(module: nn.Module) -> Iterator[None]:
    """Run ``module`` with eager attention inside the block: SDPA has no vmap batching rule
    (functorch falls back to a slow per-example loop) and no forward-mode AD on CPU."""
    config = getattr(module, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is None or old == "eager":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = old


def encode_rows(encoder: Encoder, examples: Sequence[Example]) -> ModelBatch:
    """The left-padded batch of ``examples``' prompts."""
    return encoder.classification(examples, [encoder.spec.prompt(ex) for ex in examples])


def readout_accuracy(outputs: Tensor, readout: Tensor, labels: Tensor) -> float:
    """Accuracy of the label-word outputs ``f`` ``(N, O)`` (e.g. ``f0``, the zero-shot model):
    the predicted class is the argmax of the logits ``R f`` (``R R^T`` projects out only a
    shift shared by every class, which the argmax ignores)."""
    pred = (outputs.double() @ readout.double().T).argmax(1)
    return float((pred == labels.to(pred.device)).double().mean())
