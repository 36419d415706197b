"""A faster language-model head for the last positions of a prompt.

Transformers computes ``lm_head(hidden_states[:, -k:, :])``. On a batch of more than one row that
slice is not contiguous, and ``F.linear`` then runs as a batched matmul against a broadcast copy
of the whole ``V x H`` weight per row, forward and backward, which is memory-bound. Inside
:func:`output_head` the head makes its input contiguous, and, given ``rows``, it
computes only those vocabulary rows (the eNTK needs the label words' logits only, not 49,152 of
them). The numbers are the head's own; only the matmul's shape changes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def output_head(module: nn.Module, rows: Sequence[int] | None = None) -> Iterator[bool]:
    """Run ``module``'s LM head as one matmul on a contiguous input inside the block.

    Args:
        module: a transformers causal LM (or a peft model around one).
        rows: vocabulary ids; if given, the logits inside the block are ``(..., len(rows))``
            with column ``i`` the logit of token ``rows[i]``.

    Yields:
        Whether the head was replaced. ``False`` when the model has no plain ``nn.Linear``
        output embedding; then its own head runs and the logits cover the whole vocabulary.
    """
    get_head = getattr(module, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        yield False
        return
    ids = None if rows is None else torch.as_tensor(list(rows), dtype=torch.long, device=head.weight.device)

    def forward(hidden: Tensor) -> Tensor:
        # head.weight is read at call time, so torch.func.functional_call's swapped weights apply.
        weight, bias = head.weight, head.bias
        if ids is not None:
            weight, bias = weight[ids], None if bias is None else bias[ids]
        return F.linear(hidden.contiguous(), weight, bias)

    outer = vars(head).get("forward")  # an enclosing output_head's, restored on exit
    head.forward = forward
    try:
        yield True
    finally:
        if outer is None:
            del head.forward
        else:
            head.forward = outer
