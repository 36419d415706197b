"""Streaming LESS scores, top-k selection and the selection's output files.

The LESS score of training example ``i`` (Xia et al., 2024, eq. 2, with subtasks) is

    ``score_i = max_g  mean_{j in g}  sum_c  lr_c * cos(train_c[i], target_c[j])``

over checkpoints ``c`` (lr_c: that epoch's mean learning rate) and target subtasks ``g``. Since a
mean of cosines with fixed unit vectors is a dot product with their mean, each checkpoint's
targets collapse to one vector per subtask, ``q_{c,g} = lr_c * mean_{j in g} t_{c,j} / |t_{c,j}|``,
and ``score_i = max_g sum_c <x_{c,i}, q_{c,g}> / |x_{c,i}|``: one streaming pass over the
training stores with memory ``O(chunk_rows x dim)``, whatever their size.

With ``curvature_damping`` (lambda), the queries are first preconditioned by the inverse of the
damped second moment of the training features, as TRAK and influence functions precondition
gradients by an inverse Gauss-Newton / Fisher matrix:

    ``q'_{c,g} = (F_c + lambda * mean(diag F_c) * I)^{-1} q_{c,g}``,  ``F_c = mean_i u_{c,i} u_{c,i}^T``

(``u_{c,i}``: the unit training features of checkpoint ``c``), so directions every training
example shares count less than rare ones. One extra streaming pass builds ``F_c`` (float64,
``dim x dim``: 512 MiB at dim 8192); lambda -> infinity gives back the plain LESS ranking.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ftlab.errors import FtlabError
from ftlab.io import atomic_file
from ftlab.select.datastore import Datastore


def make_id(source: str, line: int) -> str:
    """The example id ``"<source file>:<line>"`` that maps a datastore row back to its file and line."""
    return f"{source}:{line}"


def split_id(id_: str) -> tuple[str, int | None]:
    """Inverse of :func:`make_id`: ``(source, line)``, or ``(id, None)`` for an id without a line."""
    source, sep, line = id_.rpartition(":")
    if sep and line.isdigit():
        return source, int(line)
    return id_, None


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64; all-zero rows stay zero (cosine 0, never NaN)."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_stores(train: Sequence[Datastore], targets: Sequence[Datastore], lr_weights: Sequence[float]) -> None:
    """Raise unless the stores can be scored together (see :func:`less_scores`)."""
    if not train or len(train) != len(targets) or len(lr_weights) != len(train):
        raise FtlabError(f"LESS needs one train store, one target store and one lr weight per checkpoint; got "
                         f"{len(train)} train, {len(targets)} target stores and {len(lr_weights)} weights")
    if not all(math.isfinite(w) for w in lr_weights):
        raise FtlabError(f"lr weights must be finite, got {list(lr_weights)}")
    ref = train[0].manifest
    for c, (tr, tg) in enumerate(zip(train, targets)):
        if len(tg) == 0:
            raise FtlabError(f"target datastore {tg.path} is empty; give at least one target example")
        for store in (tr, tg):
            m = store.manifest
            for key in ("model", "dim", "projection"):
                if getattr(m, key) != getattr(ref, key):
                    raise FtlabError(f"{store.path} has {key}={getattr(m, key)} but {train[0].path} has "
                                     f"{getattr(ref, key)}; compute all features with the same {key}")
        if tr.manifest.checkpoint != tg.manifest.checkpoint:
            raise FtlabError(f"checkpoint {c}: train store {tr.path} is from {tr.manifest.checkpoint!r} but target "
                             f"store {tg.path} from {tg.manifest.checkpoint!r}; pair stores of the same checkpoint")
        if tr.ids != train[0].ids or tg.ids != targets[0].ids:
            bad = tr if tr.ids != train[0].ids else tg
            raise FtlabError(f"{bad.path} lists other example ids (or another order) than the store of "
                             f"checkpoint 0; write every checkpoint's features for the same examples")


def _group_queries(targets: Sequence[Datastore], lr_weights: Sequence[float],
                   target_groups: Sequence[str] | None) -> np.ndarray:
    """``(checkpoints, groups, dim)``: lr-weighted means of the unit target features per group."""
    n = len(targets[0])
    groups = list(target_groups) if target_groups is not None else [""] * n
    if len(groups) != n:
        raise FtlabError(f"target_groups has {len(groups)} labels for {n} target examples; give one per example")
    names = list(dict.fromkeys(groups))  # first-appearance order
    member = np.zeros((len(names), n))
    for j, g in enumerate(groups):
        member[names.index(g), j] = 1.0
    member /= member.sum(axis=1, keepdims=True)
    return np.stack([w * member @ _unit_rows(t.read(0, len(t))) for t, w in zip(targets, lr_weights)])


def less_scores(train: Sequence[Datastore], targets: Sequence[Datastore], lr_weights: Sequence[float],
                target_groups: Sequence[str] | None = None, chunk_rows: int = 8192,
                progress: bool = False, curvature_damping: float | None = None) -> np.ndarray:
    """LESS scores of every training example (see the module docstring for the formula).

    Args:
        train: per checkpoint, the training examples' features (same ids, same order).
        targets: per checkpoint, the target examples' features (same ids, same order).
        lr_weights: per checkpoint, its weight (the epoch's mean learning rate).
        target_groups: subtask label per target example (default: one group).
        chunk_rows: training rows read at a time; memory is about ``chunk_rows x dim x 4`` bytes
            (one float32 chunk at a time) plus the targets, whatever the number of rows.
        progress: show a progress bar.
        curvature_damping: None (LESS as published), or lambda > 0: precondition the queries by
            the inverse damped second moment of the training features (module docstring).

    Returns:
        ``(N,)`` float64 scores in training-store row order. Features need not be normalised.

    Raises:
        FtlabError: empty targets, counts that disagree, or stores of different model, dim,
            projection or (between a train and its target store) checkpoint.
    """
    _check_stores(train, targets, lr_weights)
    queries = _group_queries(targets, lr_weights, target_groups)
    if curvature_damping is not None:
        queries = np.stack([precondition(store, q, curvature_damping, chunk_rows, progress)
                            for store, q in zip(train, queries)])
    queries = queries.astype(np.float32)
    n = len(train[0])
    scores = np.empty(n, dtype=np.float64)
    for start in tqdm(range(0, n, chunk_rows), desc="LESS scores", unit="chunk", disable=not progress):
        acc = np.zeros((min(chunk_rows, n - start), queries.shape[1]))
        for store, q in zip(train, queries):
            x = store.read(start, start + chunk_rows)
            norms = np.sqrt(np.einsum("ij,ij->i", x, x).astype(np.float64))  # ~6x np.linalg.norm
            # Divide the (rows x groups) products, not the (rows x dim) chunk: cheaper.
            acc += np.divide(x @ q.T, norms[:, None], out=np.zeros_like(acc),
                             where=norms[:, None] > 0)
        scores[start:start + len(acc)] = acc.max(axis=1)
    return scores


def precondition(store: Datastore, queries: np.ndarray, damping: float, chunk_rows: int = 8192,
                 progress: bool = False) -> np.ndarray:
    """``(F + damping * mean(diag F) * I)^{-1} queries.T`` as rows, ``F`` the mean outer product of
    ``store``'s unit rows (one streaming pass, float64)."""
    if not (math.isfinite(damping) and damping > 0):
        raise FtlabError(f"curvature_damping must be a finite number > 0 (got {damping})")
    dim, n = queries.shape[1], len(store)
    second = np.zeros((dim, dim))
    for start in tqdm(range(0, n, chunk_rows), desc="feature second moment", unit="chunk", disable=not progress):
        u = _unit_rows(store.read(start, start + chunk_rows))
        second += u.T @ u
    second /= n
    ridge = damping * max(float(np.trace(second)) / dim, np.finfo(np.float64).tiny)
    second[np.diag_indices(dim)] += ridge
    return np.linalg.solve(second, queries.T).T  # symmetric positive definite: well posed for damping > 0


def select_top(scores: np.ndarray, ids: Sequence[str], k: int | None = None,
               fraction: float | None = None) -> list[int]:
    """Rows of the ``k`` best scores (or the best ``ceil(fraction * N)``), best first.

    Ties go to the lower row index, so the selection is deterministic.

    Raises:
        FtlabError: neither or both of ``k``/``fraction``, out-of-range values, NaN scores or a
            length mismatch between ``scores`` and ``ids``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if len(ids) != n:
        raise FtlabError(f"{n} scores for {len(ids)} ids; they must be equally many")
    if (k is None) == (fraction is None):
        raise FtlabError("select either k (a number of examples) or fraction (e.g. 0.05), not both or neither")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise FtlabError(f"fraction must be in (0, 1], got {fraction}")
        k = math.ceil(round(fraction * n, 9))  # round: 0.07 * 100 is 7.000000000000001
    if k < 0 or k > n:
        raise FtlabError(f"k={k} is outside [0, {n}] (the number of scored examples)")
    if np.isnan(scores).any():
        raise FtlabError(f"{int(np.isnan(scores).sum())} scores are NaN (e.g. row {int(np.argmax(np.isnan(scores)))}); "
                         f"drop those examples before selecting")
    return np.lexsort((np.arange(n), -scores))[:k].tolist()


def write_selection(path_jsonl: str | Path, path_csv: str | Path, ids: Sequence[str], scores: np.ndarray,
                    selected: Sequence[int], sources: Sequence[str] | None = None,
                    lines: Sequence[int | None] | None = None) -> None:
    """Write the selection and all scores, each file atomically.

    ``path_jsonl`` gets one record per selected example, best first:
    ``{"id", "source", "line", "score", "rank"}`` (rank 1 is the best). ``path_csv`` gets every
    example in row order with columns ``row, id, source, line, score, rank`` (rank empty when not
    selected). ``sources``/``lines`` default to what :func:`split_id` reads from the ids.
    """
    n = len(ids)
    if len(scores) != n or (sources is not None and len(sources) != n) or (lines is not None and len(lines) != n):
        raise FtlabError(f"write_selection needs one score, source and line per id ({n} ids)")
    parsed = [split_id(i) for i in ids]
    sources = list(sources) if sources is not None else [s for s, _ in parsed]
    lines = list(lines) if lines is not None else [ln for _, ln in parsed]
    rank = {row: r for r, row in enumerate(selected, start=1)}
    with atomic_file(path_jsonl) as f:
        for r, row in enumerate(selected, start=1):
            f.write(json.dumps({"id": ids[row], "source": sources[row], "line": lines[row],
                                "score": float(scores[row]), "rank": r}) + "\n")
    with atomic_file(path_csv) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["row", "id", "source", "line", "score", "rank"])
        for row in range(n):
            writer.writerow([row, ids[row], sources[row], "" if lines[row] is None else lines[row],
                             repr(float(scores[row])), rank.get(row, "")])
