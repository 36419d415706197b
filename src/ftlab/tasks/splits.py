"""Deterministic train/dev/test splits, following the MeZO / LM-BFF protocol.

The test set is drawn with ``data_seed`` alone, so every training seed is scored on the same
test examples; train and dev are then drawn with ``seed`` from what is left. Splits are
disjoint, depend only on their arguments (each draw has its own ``random.Random``), and
grow by extension: a larger ``n_test`` with the same ``data_seed`` keeps the smaller test set.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ftlab.errors import FtlabError
from ftlab.tasks.base import Example


@dataclass
class Splits:
    """Train, dev and test examples; ``note`` says how sizes were reduced, if they were."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    note: str = ""


def make_splits(examples: Sequence[Example], *, seed: int, n_train: int, n_dev: int, n_test: int,
                k_per_class: int | None = None, data_seed: int = 0) -> Splits:
    """Split ``examples`` into disjoint train, dev and test sets.

    Args:
        examples: the task's examples, in their canonical (loader) order.
        seed: draws train and dev from the examples outside the test set.
        n_train, n_dev, n_test: requested sizes. When there are fewer examples than
            ``n_train + n_dev + n_test``, all three are scaled down by the same factor
            (rounded down) and :attr:`Splits.note` says so.
        k_per_class: few-shot mode: train gets exactly ``k`` examples of every class, and so does
            dev unless ``n_dev == 0``; ``n_train`` and ``n_dev`` are then ignored. If the examples
            outside the test set would not cover that, the test set is cut to the longest prefix
            of its draw that does (and :attr:`Splits.note` says so). Classification only.
        data_seed: draws the test set.

    Raises:
        FtlabError: no examples, a negative size, ``k_per_class`` on unlabelled examples, or a
            class with too few examples for ``k_per_class``.
    """
    if not examples:
        raise FtlabError("cannot split an empty task: it has no examples")
    if min(n_train, n_dev, n_test) < 0:
        raise FtlabError(f"split sizes must be >= 0, got n_train={n_train} n_dev={n_dev} n_test={n_test}")
    order = list(range(len(examples)))
    random.Random(f"ftlab-test:{data_seed}").shuffle(order)
    if k_per_class is not None:
        return _k_shot(examples, order, seed, k_per_class, with_dev=n_dev > 0, n_test=n_test)
    (n_train, n_dev, n_test), note = _fit((n_train, n_dev, n_test), len(examples))
    rest = _shuffled(sorted(order[n_test:]), seed)
    return Splits(train=[examples[i] for i in rest[:n_train]],
                  dev=[examples[i] for i in rest[n_train:n_train + n_dev]],
                  test=[examples[i] for i in order[:n_test]], note=note)


def _fit(sizes: tuple[int, int, int], available: int) -> tuple[tuple[int, int, int], str]:
    """Scale the requested sizes down proportionally when they exceed ``available``."""
    total = sum(sizes)
    if total <= available:
        return sizes, ""
    train, dev, test = (n * available // total for n in sizes)
    scaled = (train, dev, test)
    return scaled, (f"only {available} examples for the {total} requested: train/dev/test scaled "
                    f"from {'/'.join(map(str, sizes))} to {'/'.join(map(str, scaled))}")


def _shuffled(indices: list[int], seed: int) -> list[int]:
    random.Random(f"ftlab-train:{seed}").shuffle(indices)
    return indices


def _test_size_leaving(examples: Sequence[Example], order: list[int], n_test: int, per_class: int) -> int:
    """The longest test prefix of ``order`` (at most ``n_test``) that leaves ``per_class``
    examples of every class outside it; it depends on ``data_seed`` only, like the test set."""
    left = Counter(ex.label for ex in examples)
    for size, i in enumerate(order[:n_test]):
        if left[examples[i].label] <= per_class:
            return size
        left[examples[i].label] -= 1
    return min(n_test, len(order))


def _k_shot(examples: Sequence[Example], order: list[int], seed: int, k: int, *, with_dev: bool,
            n_test: int) -> Splits:
    """Balanced few-shot train (and dev): the first ``k`` of each class in a seeded shuffle."""
    if k <= 0:
        raise FtlabError(f"k_per_class must be >= 1, got {k}")
    if any(ex.label is None for ex in examples):
        raise FtlabError("k_per_class needs labelled (classification) examples; "
                         "leave it unset for generation tasks and use n_train/n_dev")
    wanted = [k, k if with_dev else 0]  # per class, for train and dev
    capped = _test_size_leaving(examples, order, n_test, sum(wanted))
    note = "" if capped == n_test else f"n_test capped from {n_test} to {capped} to leave {k} per class"
    counts = {label: [0, 0] for label in sorted(Counter(ex.label for ex in examples))}
    picked: list[list[int]] = [[], []]  # train indices, dev indices
    for i in _shuffled(sorted(order[capped:]), seed):
        count = counts[examples[i].label]
        target = next((j for j in (0, 1) if count[j] < wanted[j]), None)
        if target is not None:
            count[target] += 1
            picked[target].append(i)
    for label, count in counts.items():
        if count != wanted:
            raise FtlabError(f"k_per_class={k}: class {label} has only {sum(count)} examples outside the "
                             f"{capped} test examples, {sum(wanted)} needed; lower k_per_class or n_test")
    return Splits(train=[examples[i] for i in picked[0]], dev=[examples[i] for i in picked[1]],
                  test=[examples[i] for i in order[:capped]], note=note)
