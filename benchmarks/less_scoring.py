"""Streaming LESS scoring of a large synthetic float16 datastore against 64 target vectors.

    python benchmarks/less_scoring.py --rows 1000000 --dim 8192 --path /tmp/less-bench

Writes ``rows x dim`` float16 features (synthetic: a seeded pool of normal rows, rolled and
signed/scaled per batch and row, see ``write_store``) with
``DatastoreWriter`` (resumable: rerun after a kill to finish), 64 float32 target vectors, then
scores the store in a fresh process -- so its peak RSS (``ru_maxrss``) counts only scoring --
twice: all targets in one group (mean over 64 cosines) and each target its own group (max over
64). A complete store at ``--path`` is reused (an incomplete one is finished: the writer resumes).
Checks 1000 random rows against a float64 computation, prints a table and writes
benchmarks/results/less_scoring.json. ``--cleanup`` deletes the store afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ftlab.errors import FtlabError
from ftlab.memory import meminfo_bytes, status_bytes
from ftlab.select import Datastore, DatastoreWriter, ProjectionSpec, less_scores

from _common import clock, machine, table, write_json

BATCH = 8192  # rows generated at a time


def fields(dim: int, grad_type: str) -> dict:
    """Manifest fields of the synthetic stores (train and targets must agree on all but grad_type)."""
    return dict(model="synthetic", checkpoint="epoch-1", grad_type=grad_type, dim=dim,
                projection=ProjectionSpec(dim_in=460_800, dim_out=dim, seed=0))


def write_store(path: Path, rows: int, dim: int, shard_rows: int) -> None:
    """Write (or finish writing) the synthetic train store."""
    writer = DatastoreWriter(path, **fields(dim, "adam"), dtype="float16", shard_rows=shard_rows)
    done = len(writer.done_ids())
    # Drawing 8e9 normals would dominate the run: batch b is a fixed pool of normal rows rolled
    # by a seeded column offset, with seeded per-row signs and scales (every row differs).
    pool = np.random.default_rng(0).standard_normal((BATCH, dim), dtype=np.float32)
    for lo in range(done - done % BATCH, rows, BATCH):
        hi = min(rows, lo + BATCH)
        rng = np.random.default_rng([0, lo])
        x = np.roll(pool[:hi - lo], int(rng.integers(dim)), axis=1)
        x *= (rng.choice([-1.0, 1.0], hi - lo) * rng.uniform(0.5, 2.0, hi - lo)).astype(np.float32)[:, None]
        writer.append([f"synthetic.jsonl:{i + 1}" for i in range(lo, hi)], x)
        print(f"\rwritten {hi:,d} / {rows:,d} rows", end="", file=sys.stderr, flush=True)
    writer.close()
    print(file=sys.stderr)


def write_targets(path: Path, n: int, dim: int) -> None:
    writer = DatastoreWriter(path, **fields(dim, "sgd"), dtype="float32")
    writer.append([f"target.jsonl:{j + 1}" for j in range(n)],
                  np.random.default_rng(1).standard_normal((n, dim), dtype=np.float32))
    writer.close()


def mb(n_bytes: int) -> int:
    return round(n_bytes / 2**20)


def score(path: Path, targets: Path, groups: str, chunk_rows: int) -> dict:
    """Score in this process; time, peak RSS and a float64 check of 1000 random rows.

    Peak RSS is ``VmHWM``, which starts afresh at exec (``ru_maxrss`` would inherit the parent's
    high-water mark through fork).
    """
    rss_before = mb(status_bytes("VmHWM"))
    cached = mb(meminfo_bytes("Cached"))
    with clock() as opening:
        train, target = Datastore.open(path), Datastore.open(targets)
    labels = [str(j) for j in range(len(target))] if groups == "each" else None
    with clock() as scoring:
        scores = less_scores([train], [target], [1.0], labels, chunk_rows=chunk_rows)
    score_s = scoring.seconds
    rows = np.random.default_rng(2).choice(len(train), 1000, replace=False)
    x = train.take(rows).astype(np.float64)
    t = target.read(0, len(target)).astype(np.float64)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    want = cos.max(1) if groups == "each" else cos.mean(1)
    return {"groups": groups, "open_s": round(opening.seconds, 2), "score_s": round(score_s, 2),
            "rows_per_s": round(len(train) / score_s), "peak_rss_mb": mb(status_bytes("VmHWM")),
            "rss_after_imports_mb": rss_before, "page_cache_at_start_mb": cached,
            "max_abs_err_vs_float64": float(np.abs(scores[rows] - want).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=16384)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--path", type=Path, default=Path("/tmp/less-bench"))
    parser.add_argument("--cleanup", action="store_true", help="delete the datastore at the end")
    parser.add_argument("--score-only", choices=["one", "each"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    train_path, target_path = args.path / "train", args.path / "targets"
    if args.score_only:
        print(json.dumps(score(train_path, target_path, args.score_only, args.chunk_rows)))
        return

    try:
        reused = len(Datastore.open(train_path)) == args.rows
    except FtlabError:  # no store yet, or an incomplete one: (finish) writing it
        reused = False
    write_s = None
    if not reused:
        with clock() as writing:
            write_store(train_path, args.rows, args.dim, args.shard_rows)
        write_s = writing.seconds
    write_targets(target_path, args.targets, args.dim)
    size = sum(f.stat().st_size for f in train_path.glob("*.bin"))
    runs = []
    for groups in ["one", "each"]:
        child = subprocess.run([sys.executable, __file__, "--score-only", groups, "--path", str(args.path),
                                "--chunk-rows", str(args.chunk_rows)], capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    out = {"rows": args.rows, "dim": args.dim, "dtype": "float16", "targets": args.targets,
           "shard_rows": args.shard_rows, "chunk_rows": args.chunk_rows, "datastore_gb": round(size / 1e9, 2),
           "write_s": None if reused else round(write_s, 1), "reused_store": reused, "runs": runs,
           "machine": machine()}
    how = "reused (already complete)" if reused else f"written in {write_s:.0f} s"
    print(f"datastore: {args.rows:,d} x {args.dim} float16 = {size / 1e9:.2f} GB, {how}")
    print(table([("1 group (mean of 64)" if r["groups"] == "one" else "64 groups (max of 64)", f"{r['score_s']:.1f}",
                  f"{r['rows_per_s']:,d}", f"{r['peak_rss_mb']:,d}", f"{r['rss_after_imports_mb']:,d}",
                  f"{r['max_abs_err_vs_float64']:.2e}") for r in runs],
                ("target groups", "score s", "rows/s", "peak RSS MB", "RSS after imports", "max err vs f64")))
    write_json("less_scoring.json", out)
    if args.cleanup:
        shutil.rmtree(args.path)


if __name__ == "__main__":
    main()
