"""Losses of one batch at K settings of the trainable tensors, in one batched forward.

Zeroth-order optimizers evaluate the same batch at several nearby parameter values. When the
trainable tensors are small (LoRA adapters, a prefix) the K settings fit in memory side by side,
and the K forwards can run as one: ``torch.func.vmap`` over ``torch.func.functional_call`` maps
the forward over the stacked trainable tensors (``K x shape`` each) while the frozen weights
stay shared (not mapped). In effect the batch is repeated K times, copy k with its own
trainable tensors: one launch of every kernel for K forwards, which is what keeps a GPU busy
on small batches (FZOO, Dang et al., 2026, evaluate their N perturbations this way).

Memory: the K stacked copies of the trainable tensors, and K times the activations of one
forward from the first layer that reads a mapped tensor onwards. An operation vmap has no
batching rule for (PyTorch's CPU flash-attention kernel, with a warning) runs once per copy
through vmap's fallback: the same numbers, without the speed-up.

* :func:`batched_losses` -- the core: ``(model, {name: K x ...}, loss_fn) -> Tensor[K]``.
* :class:`BatchedObjective` -- what an optimizer is given as its closure: ``closure()`` is the
  loss at the current parameters (a plain closure), ``closure.losses(stacked)`` the K losses.
* :func:`batched_objective` -- that closure for ``objective_fn("loss", ...)``'s batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ftlab.errors import FtlabError
from ftlab.objectives import Encoder, loss, training_batch
from ftlab.tasks.base import Example

# loss_fn(model): the loss of a fixed batch, a 0-d tensor, computed by calling ``model`` (which
# may be a stand-in running the real model with some tensors replaced)
LossFn = Callable[[Any], Tensor]


class _WithTensors:
    """Calls ``module`` with some of its parameters or buffers replaced by ``tensors``, and
    passes attribute look-ups (config, get_output_embeddings, ...) through to ``module``."""

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor]) -> None:
        self.module, self.tensors = module, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self.tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def batched_losses(model: nn.Module, stacked: dict[str, Tensor], loss_fn: LossFn) -> Tensor:
    """``loss_fn`` at K settings of some of ``model``'s tensors, from one vmapped forward.

    Args:
        model: the module (e.g. a peft model); its other parameters and buffers are shared.
        stacked: ``{name: K x shape}`` for tensors of ``model`` (names as ``named_parameters``
            gives them); setting k is ``{name: t[k]}``.
        loss_fn: ``loss_fn(m)`` returns the loss (0-d) of a fixed batch, calling ``m`` as it
            would the model; it must be vmappable (no data-dependent control flow on outputs).

    Returns:
        ``Tensor[K]``: entry k the loss with setting k (equal to ``loss_fn(model)`` with those
        values loaded, up to the rounding of batched matmuls).
    """
    known = dict(model.named_parameters())
    missing = [n for n in stacked if n not in known]
    if missing:
        raise FtlabError(f"batched_losses: {missing[0]!r} is not a parameter of the model")
    sizes = {t.shape[0] for t in stacked.values()}
    if len(sizes) != 1:
        raise FtlabError(f"batched_losses: stacked tensors must share their first (K) size (got {sorted(sizes)})")

    def one(values: dict[str, Tensor]) -> Tensor:
        return loss_fn(_WithTensors(model, values))

    return vmap(one)(stacked)


class BatchedObjective:
    """A closure for optimizers that can evaluate many parameter settings at once (FZOO with
    ``batched=True``). ``objective()`` is the loss at the current parameters, so it is also an
    ordinary closure; ``objective.losses(stacked)`` is :func:`batched_losses` on the same batch;
    ``objective.name_of(p)`` the name of parameter ``p`` in ``model``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model, self.loss_fn = model, loss_fn
        self._names = {id(p): n for n, p in model.named_parameters()}

    def __call__(self) -> Tensor:
        return self.loss_fn(self.model)

    def losses(self, stacked: dict[str, Tensor]) -> Tensor:
        return batched_losses(self.model, stacked, self.loss_fn)

    def name_of(self, p: Tensor) -> str:
        name = self._names.get(id(p))
        if name is None:
            raise FtlabError("a parameter of the optimizer is not a parameter of the batched objective's model")
        return name


def batched_objective(model: nn.Module, encoder: Encoder, examples: Sequence[Example],
                      device: torch.device | str) -> BatchedObjective:
    """:class:`BatchedObjective` for the training loss on ``examples``: the batch and the loss
    of ``ftlab.objectives.objective_fn("loss", model, ...)``, evaluable at K settings at once."""
    batch = training_batch(encoder, examples).to(device)
    return BatchedObjective(model, lambda m: loss(m, batch, encoder.option_ids))
