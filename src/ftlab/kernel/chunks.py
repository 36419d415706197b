"""The order and chunks in which an eNTK's rows are computed: examples sorted by prompt length,
cut into chunks that waste little padding."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from ftlab.objectives import Encoder, prompt_ids
from ftlab.tasks.base import Example


def prompt_lengths(encoder: Encoder, examples: Sequence[Example]) -> list[int]:
    """Token counts of the examples' prompts as :func:`encode_rows` encodes them."""
    return [len(prompt_ids(encoder.tokenizer, encoder.spec.prompt(ex), encoder.max_length)) for ex in examples]


class RowPlan(NamedTuple):
    """The order and chunks in which :func:`compute_kernel` computes an eNTK's rows."""

    train_order: list[int]  # indices into train, by prompt length
    test_order: list[int]  # indices into test, by prompt length
    rows: list[Example]  # train then test examples, each part by prompt length
    lengths: list[int]  # token count of each of rows
    chunks: list[tuple[int, int]]  # (start, end) into rows; no chunk mixes train and test


def plan_rows(encoder: Encoder, train: Sequence[Example], test: Sequence[Example], chunk_size: int,
              max_padding: float) -> RowPlan:
    """Training then test examples, each sorted by prompt length (ties keep their order), in
    chunks of :func:`length_chunks`: chunks of similar length waste little compute on padding."""
    orders, lengths, chunks = [], [], []
    for part in (train, test):
        part_len = prompt_lengths(encoder, part)
        order = sorted(range(len(part)), key=part_len.__getitem__)
        offset = len(lengths)
        orders.append(order)
        lengths += [part_len[i] for i in order]
        chunks += [(s + offset, e + offset) for s, e in length_chunks(lengths[offset:], chunk_size, max_padding)]
    rows = [train[i] for i in orders[0]] + [test[i] for i in orders[1]]
    return RowPlan(orders[0], orders[1], rows, lengths, chunks)


def length_chunks(lengths: Sequence[int], size: int, max_padding: float) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` chunks of at most ``size`` rows, cut early where padding a
    chunk to its longest row would make it more than ``1 + max_padding`` times its real tokens.

    Sorted prompt lengths thin out towards the long end, and padded tokens cost as much as real
    ones; a long row on its own is already a large matmul, so short chunks there lose little.
    """
    chunks, start = [], 0
    while start < len(lengths):
        end, longest, total = start + 1, lengths[start], lengths[start]
        while end < len(lengths) and end - start < size:
            wider = max(longest, lengths[end])
            if wider * (end + 1 - start) > (1 + max_padding) * (total + lengths[end]):
                break
            longest, total, end = wider, total + lengths[end], end + 1
        chunks.append((start, end))
        start = end
    return chunks
