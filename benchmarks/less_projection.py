"""Per-example cost and accuracy of the LESS gradient projections on CPU, side by side.

    python benchmarks/less_projection.py --repeats 5

For LoRA (r=8) gradients of SmolLM2-135M -- on q,v (460,800 entries) and on all seven linear
modules (2,442,240) -- projected to d=8192 in batches of 16 through ``Projector.project_blocks``
(one block per LoRA tensor, as the feature code calls it): the sparse JL sketch with s = 1, 4
and 8 nonzeros per coordinate against the blocked dense Rademacher matrix generated on the fly
(only for D <= --dense-max-dim: one batch of it takes minutes).
Inputs are heavy-tailed (Student-t, 3 dof), like Adam-preconditioned gradients. Per method:
one-time setup (building the sparse matrices), median and min wall time per batch and per
example, CPU time per example (all threads; less sensitive to other processes on a shared machine),
cache memory, and the error of the 120 pairwise cosines of the batch against the exact ones
(max and RMS x sqrt(d), which is ~1 for a JL map) next to ``jl_tolerance(d, 16)``.
Prints a table and writes benchmarks/results/less_projection.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from ftlab.grads.projection import ProjectionSpec, Projector, jl_tolerance

from _common import clock, machine, median, write_json

HIDDEN, INTERMEDIATE, KV, LAYERS, RANK = 576, 1536, 192, 30, 8  # SmolLM2-135M
MODULES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
           "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}
TARGETS = {"q,v": ["q", "v"], "all-linear": list(MODULES)}


def lora_block_sizes(modules: list[str]) -> list[int]:
    """Entries of each LoRA tensor (A: r x in, B: out x r) per layer, in model order."""
    return [n for _ in range(LAYERS) for m in modules for n in (RANK * MODULES[m][0], MODULES[m][1] * RANK)]


def student_t(shape: tuple[int, int], dof: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t samples, ``z / sqrt(chi2_dof / dof)``, from an explicit generator."""
    chi2 = sum(torch.randn(shape, generator=gen).square_() for _ in range(dof))
    return torch.randn(shape, generator=gen) / (chi2 / dof).sqrt_()


def cosine_errors(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Max and RMS error of the projected pairwise cosines, against the exact ones in float64."""
    def cos(a: torch.Tensor) -> torch.Tensor:
        a = a.double() / a.double().norm(dim=1, keepdim=True)
        return a @ a.T

    off = ~torch.eye(len(x), dtype=torch.bool)
    err = (cos(y) - cos(x))[off]
    return err.abs().max().item(), err.pow(2).mean().sqrt().item()


def project(projector: Projector, blocks: list[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """One projection of a batch: result, wall seconds, CPU seconds (all threads)."""
    cpu = time.process_time()
    with clock() as wall:
        y = projector.project_blocks(blocks)
    return y, wall.seconds, time.process_time() - cpu


def measure(specs: list[ProjectionSpec], blocks: list[torch.Tensor], x: torch.Tensor, repeats: int) -> list[dict]:
    """Setup time, median (and min) batch time, CPU time, cache size and cosine errors of each
    projection; the sparse ones' timed calls are interleaved, so machine noise hits all alike."""
    projectors = [Projector(spec) for spec in specs]
    first = [project(p, blocks) for p in projectors]  # builds (and caches) the sparse matrices
    # Nothing is cached for the dense map: its first call is its (only) timed call.
    walls = [[t] if p.spec.kind == "rademacher" else [] for p, (_, t, _) in zip(projectors, first)]
    cpus = [[c] if p.spec.kind == "rademacher" else [] for p, (_, _, c) in zip(projectors, first)]
    for _ in range(repeats):
        for k, p in enumerate(projectors):
            if p.spec.kind == "sparse":
                _, wall, cpu = project(p, blocks)
                walls[k].append(wall)
                cpus[k].append(cpu)
    rows = []
    for p, (y, first_wall, _), wall, cpu in zip(projectors, first, walls, cpus):
        batch = median(wall)
        cache = sum(m.values().numel() * 8 + m.crow_indices().numel() * 4 for m in p._tables.values())
        max_err, rms = cosine_errors(x, y)
        sparse = p.spec.kind == "sparse"
        rows.append({"kind": p.spec.kind, "sparsity": p.spec.sparsity if sparse else None,
                     "setup_s": round(first_wall - batch, 3) if sparse else 0.0,
                     "batch_s": round(batch, 4), "per_example_ms": round(1000 * batch / len(x), 2),
                     "min_per_example_ms": round(1000 * min(wall) / len(x), 2),
                     "cpu_per_example_ms": round(1000 * median(cpu) / len(x), 2),
                     "cache_mb": round(cache / 2**20, 1), "cos_err_max": round(max_err, 4),
                     "cos_err_rms_x_sqrt_d": round(rms * p.spec.dim_out**0.5, 3),
                     "all_batch_s": [round(t, 4) for t in wall]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim-out", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per sparse method")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--sparsities", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--dense-max-dim", type=int, default=500_000,
                        help="run the (slow: generated on the fly) dense Rademacher map only up to this D")
    args = parser.parse_args()

    out = {"dim_out": args.dim_out, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "jl_tolerance_16_points_delta_0.01": round(jl_tolerance(args.dim_out, args.batch_size), 4),
           "dense_max_dim": args.dense_max_dim, "machine": machine(), "rows": []}
    rows = out["rows"]
    for target in args.targets:
        sizes = lora_block_sizes(TARGETS[target])
        dim_in = sum(sizes)
        x = student_t((args.batch_size, dim_in), 3, torch.Generator().manual_seed(0))
        blocks = [b.contiguous() for b in torch.split(x, sizes, dim=1)]  # one tensor per LoRA gradient
        specs = [ProjectionSpec(dim_in, args.dim_out, seed=0, kind="sparse", sparsity=s) for s in args.sparsities]
        if dim_in <= args.dense_max_dim:
            specs.append(ProjectionSpec(dim_in, args.dim_out, seed=0, kind="rademacher"))
        for r in measure(specs, blocks, x, args.repeats):
            rows.append({"lora": target, "dim_in": dim_in, "blocks": len(blocks), **r})
            print(f"{target:10s} D={dim_in:>9,d} {r['kind']:10s} s={str(r['sparsity']):4s} "
                  f"setup {r['setup_s']:7.3f}s  batch {r['batch_s']:8.4f}s  {r['per_example_ms']:9.2f} ms/ex "
                  f"(min {r['min_per_example_ms']:.2f}, CPU {r['cpu_per_example_ms']:.2f})  "
                  f"cache {r['cache_mb']:6.1f} MB  cos err max {r['cos_err_max']:.4f}  "
                  f"rms*sqrt(d) {r['cos_err_rms_x_sqrt_d']:.3f}", flush=True)
        write_json("less_projection.json", out)  # after each LoRA size
    eps = out["jl_tolerance_16_points_delta_0.01"]
    print(f"\njl_tolerance(d={args.dim_out}, n={args.batch_size}, delta=0.01) = {eps}")


if __name__ == "__main__":
    main()
