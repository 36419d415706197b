"""Shared pieces of the kernel tests: a toy 3-class task and explicit per-example Jacobians."""

from __future__ import annotations

import torch

from ftlab.kernel.outputs import OutputFunction, eager_attention, encode_rows, label_word_ids
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec

SPEC = TaskSpec(name="toy", template="Review: {text} It was", options=[" good", " bad", " great"])
TEXTS = ["the movie was great", "terrible plot", "a good story and the acting", "bad", "the film",
         "It was the story of the plot", "and the acting was good", "great"]


def examples(n: int = len(TEXTS)) -> list[Example]:
    return [Example(id=f"toy:{i}", fields={"text": t}, label=i % 3) for i, t in enumerate(TEXTS[:n])]


def explicit_jacobians(model, tokenizer, spec, exs, names, readout) -> torch.Tensor:
    """(R, O, P) Jacobians by one autograd backward per example and output (no vmap, no padding)."""
    encoder = Encoder(tokenizer, spec)
    fn = OutputFunction(model, label_word_ids(encoder), readout)
    rows = []
    with eager_attention(model):
        for ex in exs:
            params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if n in names}
            f = fn.batch(params, encode_rows(encoder, [ex]))[0]
            rows.append(torch.stack([
                torch.cat([g.flatten() for g in torch.autograd.grad(f[o], list(params.values()), retain_graph=True)])
                for o in range(f.shape[0])]))
    return torch.stack(rows)
