"""Left padding of token batches, written once (torchtune's ``data/_collate.py`` is the model).

Batches are padded on the *left*, so every row ends at the last position: a model then needs
logits only for the last few positions (see :mod:`ftlab.objectives`). Targets are right-aligned
to match (the last ``L`` positions of every row), and positions count each row's own tokens
from 0, so a padded row is seen as the same sequence unpadded.

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)   # [[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]]
    position_ids(mask)                                   # [[0, 1, 2], [0, 0, 0]]
    right_aligned_labels([[6, 7], [8]])                  # [[6, 7], [-100, 8]]
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label of a position without a target (cross-entropy's ignore_index)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (EOS when it has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(sequences), longest)`` long tensors: each
    sequence at the end of its row after ``pad_id`` s, the mask 1 on its tokens and 0 before."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """The position of every token of left-padded rows, counted from each row's first token
    (0 on the padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def right_aligned_labels(targets: Sequence[Sequence[int]], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(len(targets), longest)`` labels: each target at the end of its row, ``ignore_index``
    before it, so that they line up with the last positions of left-padded rows."""
    span = max(len(t) for t in targets)
    labels = torch.full((len(targets), span), ignore_index, dtype=torch.long)
    for i, t in enumerate(targets):
        labels[i, span - len(t):] = torch.tensor(t)
    return labels
