"""ftlab.collate against a naive, element-by-element left padding (lists of lists), and
ModelBatch.left_padded (the batches of objectives' Encoder and of select's collate) with it."""

import random

import pytest
import torch

from ftlab.collate import IGNORE_INDEX, left_pad, pad_id, position_ids, right_aligned_labels
from ftlab.objectives import ModelBatch


def naive(sequences, pad, targets=None):
    """Every row built token by token: padding first, then the sequence; positions 0, 1, ... over
    the sequence (0 on padding); each target right-aligned after IGNORE_INDEX."""
    width = max(len(s) for s in sequences)
    ids, mask, pos = [], [], []
    for s in sequences:
        gap = width - len(s)
        ids.append([pad] * gap + list(s))
        mask.append([0] * gap + [1] * len(s))
        pos.append([0] * gap + list(range(len(s))))
    labels = None
    if targets is not None:
        span = max(len(t) for t in targets)
        labels = torch.tensor([[IGNORE_INDEX] * (span - len(t)) + list(t) for t in targets], dtype=torch.long)
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long),
            torch.tensor(pos, dtype=torch.long), labels)


def _random_rows(rng, n, longest, empty_ok=True):
    return [[rng.randrange(1, 500) for _ in range(rng.randrange(0 if empty_ok else 1, longest + 1))]
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_left_pad_equals_the_naive_padding(seed):
    rng = random.Random(seed)
    rows = _random_rows(rng, rng.randrange(1, 7), rng.randrange(1, 12))  # empty rows included
    rows[rng.randrange(len(rows))] = [7] * (max(len(r) for r in rows) or 1)
    targets = [r[len(r) - rng.randrange(0, len(r) + 1):] for r in rows]
    pad = rng.choice([0, 2, 499])
    ids, mask = left_pad(rows, pad)
    want_ids, want_mask, want_pos, want_labels = naive(rows, pad, targets)
    for got, want in [(ids, want_ids), (mask, want_mask), (position_ids(mask), want_pos),
                      (right_aligned_labels(targets), want_labels)]:
        assert got.dtype == torch.long and torch.equal(got, want)


def test_one_row_and_the_pad_id_of_a_tokenizer_without_one():
    ids, mask = left_pad([[4, 5]], pad_id=0)
    assert ids.tolist() == [[4, 5]] and mask.tolist() == [[1, 1]] and position_ids(mask).tolist() == [[0, 1]]

    class Tok:
        pad_token_id, eos_token_id = None, 9
    assert pad_id(Tok()) == 9
    Tok.pad_token_id = 0
    assert pad_id(Tok()) == 0


@pytest.mark.parametrize("seed", range(5))
def test_model_batch_left_padded_is_the_naive_batch(seed):
    rng = random.Random(seed)
    rows = _random_rows(rng, 5, 9, empty_ok=False)
    targets = [r[len(r) - rng.randrange(1, len(r) + 1):] for r in rows]
    batch = ModelBatch.left_padded(rows, 1, targets, n_options=5, gold=torch.tensor([2]))
    ids, mask, pos, labels = naive(rows, 1, targets)
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)
    assert torch.equal(batch.position_ids, pos) and torch.equal(batch.labels, labels)
    assert batch.n_options == 5 and batch.gold.tolist() == [2]
    assert ModelBatch.left_padded(rows, 1).labels is None
