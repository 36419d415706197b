"""Selection baselines beside LESS: random, and representation similarity.

Representation similarity (the "RDS" baseline of the LESS paper): every example (prompt and
response) is embedded as the mean of the model's last hidden states over its tokens; an example's
score is its cosine similarity to the target examples, averaged within each target subtask and
maxed over subtasks. The embeddings go to datastores like gradient features do, and the scores
are :func:`ftlab.select.scoring.less_scores` with one "checkpoint" of weight 1: the same
aggregation, streaming and checks as LESS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ftlab.collate import left_pad, pad_id, position_ids
from ftlab.select.data import InstructionExample, encode
from ftlab.select.datastore import Datastore, write_distributed
from ftlab.select.scoring import less_scores


def random_scores(n: int, seed: int) -> np.ndarray:
    """``n`` i.i.d. uniform scores from a generator seeded with ``seed``: their top k is a
    uniformly random k-subset."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()


@torch.no_grad()
def mean_hidden(model: nn.Module, seqs: Sequence[list[int]], pad: int) -> Tensor:
    """``(B, hidden)`` float32 mean over each sequence's tokens of the last hidden state."""
    device = next(model.parameters()).device
    ids, mask = left_pad(seqs, pad)
    ids, mask, pos = (t.to(device) for t in (ids, mask, position_ids(mask)))
    hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                   logits_to_keep=1, use_cache=False).hidden_states[-1].float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * weights).sum(1) / weights.sum(1)).cpu()


def representation_store(model: nn.Module, tokenizer: Any, examples: Sequence[InstructionExample],
                         path: str | Path, *, model_name: str, batch_size: int = 16, max_length: int = 256,
                         progress: bool = True) -> Datastore:
    """Datastore of the mean-pooled last hidden states of ``examples`` (prompt + response),
    rows in example order; resumable like the feature stores."""
    seqs = [encode(tokenizer, ex, max_length)[0] for ex in examples]
    pad = pad_id(tokenizer)
    model.eval()
    return write_distributed(path, [ex.id for ex in examples],
                             lambda idx: mean_hidden(model, [seqs[i] for i in idx], pad),
                             batch_size=batch_size, device=str(next(model.parameters()).device), progress=progress,
                             model=model_name, checkpoint="base", grad_type="representation",
                             dim=model.config.hidden_size, dtype="float32")


def representation_scores(pool: Datastore, targets: Datastore, target_groups: Sequence[str]) -> np.ndarray:
    """Cosine similarity to the targets, mean within each target group, max over groups."""
    return less_scores([pool], [targets], [1.0], target_groups)
