"""fp32 matmul throughput on this machine at the shapes of SmolLM2's MLP (576 x 1536): a
batch-1-sized one (30 tokens, as a per-example loop sees) and a batched one (2048 tokens).
The ceiling any batched eNTK / per-example-gradient path can approach. Prints a table and writes
``benchmarks/results/sgemm_peak.json``.

    python benchmarks/sgemm_peak.py --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import RESULTS, machine, table, timed, write_json


def gflops(rows: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of ``(rows x k) @ (k x n)`` in float32, best of 3 timed blocks of ``repeats``
    products after a warm-up block."""
    a, w = torch.randn(rows, k), torch.randn(k, n)

    def block() -> None:
        for _ in range(repeats):
            a @ w
    return 2 * rows * k * n * repeats / min(timed(block, 3)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=RESULTS / "sgemm_peak.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"30 x 576 x 1536 (one prompt)": (30, 576, 1536, 400),
              "2048 x 576 x 1536 (a batch)": (2048, 576, 1536, 20)}
    result = {name: gflops(*shape) for name, shape in shapes.items()}
    print(table([(name, f"{g:.0f}") for name, g in result.items()], ("fp32 matmul", "GFLOP/s")))
    write_json(args.output.absolute(), {"threads": args.threads, "gflops": result, "machine": machine()})


if __name__ == "__main__":
    main()
