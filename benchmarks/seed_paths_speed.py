"""The pairwise barrier matrix: N(N-1)/2 interpolation paths. Four ways, side by side on the same
runs, examples and alphas:

- ``loop``: the straightforward loop, pair by pair (the way ``ftlab seeds report`` measures its few
  barriers): load the model, load both runs' tensors, then for every alpha (endpoints included)
  interpolate and evaluate, tokenising the examples again for each point;
- ``shared``: ftlab.seeds.paths with one point per forward: the model is loaded once, the examples
  are tokenised once into fixed batches, and each run's own evaluation is reused as the endpoints
  of its N - 1 paths (a path costs its interior alphas only);
- ``grouped``: the same with all interior alphas of a path in one forward (LoRA: the batch is
  repeated and each copy runs through its own point's adapter weights);
- ``cached``: the same, with the frozen layers below the lowest adapter run once per batch and
  their output reused by every point (the default of ftlab.seeds.paths).

The barrier matrices must agree; the table shows seconds and the speed-up.

    python benchmarks/seed_paths_speed.py runs/seeds-sentiment-ood --runs 4 --n 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ftlab.models import load_model, prepare_model
from ftlab.objectives import Encoder
from ftlab.seeds.basins import barrier_matrix_from_means
from ftlab.seeds.interpolation import accuracy_and_loss, interpolate_, saved_train_config
from ftlab.seeds.paths import PointEvaluator, path_results
from ftlab.seeds.runner import load_records, load_study
from ftlab.seeds.topography import run_weights
from ftlab.train import load_run_data

from _common import machine, table, write_json


def loop(names, runs, cfg, spec, examples, alphas, batch_size):
    """The straightforward loop: per pair, load everything and evaluate every alpha."""
    means = np.zeros((len(names), len(names), len(alphas)))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
            module = prepare_model(model, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=0)
            wa, wb = run_weights(runs[a], cfg), run_weights(runs[names[j]], cfg)
            encoder = Encoder(tokenizer, spec, max_length=cfg.data.max_length)
            for k, alpha in enumerate(alphas):
                interpolate_(module, wa, wb, alpha)
                means[i, j, k] = accuracy_and_loss(module, encoder, examples, batch_size)["loss"]
            means[j, i] = means[i, j, ::-1]
    return means


def shared(names, runs, cfg, spec, examples, alphas, batch_size, group, cache_bottom):
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    module = prepare_model(model, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=0)
    ev = PointEvaluator(module, tokenizer, spec, {"train": examples}, batch_size=batch_size,
                        max_length=cfg.data.max_length, group=group, cache_bottom=cache_bottom)
    points = {n: run_weights(runs[n], cfg) for n in names}
    own = {n: ev.evaluate(points[n], "train") for n in names}  # each run once: the endpoints of its paths
    means = np.zeros((len(names), len(names), len(alphas)))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            res = path_results(ev, points[a], points[b], alphas, "train", (own[a], own[b]))
            means[i, j] = [r.loss.mean() for r in res]
            means[j, i] = means[i, j, ::-1]
    return means


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path)
    p.add_argument("--runs", type=int, default=4, help="the first N finished runs")
    p.add_argument("--n", type=int, default=16, help="training examples per point")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: the study's device")
    p.add_argument("--out", default="seed_paths_speed.json")
    args = p.parse_args()
    alphas = [float(x) for x in args.alphas.split(",")]
    study = load_study(args.study)
    names = [r["name"] for r in load_records(args.study)][:args.runs]
    runs = {n: args.study / "runs" / n for n in names}
    cfg = saved_train_config(runs[names[0]])
    if args.device:
        cfg.device = args.device
    data = load_run_data(study.train)
    examples = data.splits.train[:args.n]
    before = machine()
    interior = len([a for a in alphas if a not in (0.0, 1.0)])
    timings, results = {}, {}
    for name, fn in (("loop", lambda: loop(names, runs, cfg, data.spec, examples, alphas, args.batch_size)),
                     ("shared", lambda: shared(names, runs, cfg, data.spec, examples, alphas, args.batch_size, 1,
                                               False)),
                     ("grouped", lambda: shared(names, runs, cfg, data.spec, examples, alphas, args.batch_size,
                                                interior, False)),
                     ("cached", lambda: shared(names, runs, cfg, data.spec, examples, alphas, args.batch_size,
                                               interior, True))):
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[name] = fn()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
    a = np.asarray(alphas)
    barriers = {k: barrier_matrix_from_means(v, a, higher_is_better=False) for k, v in results.items()}
    agree = {k: float(np.abs(barriers[k] - barriers["loop"]).max()) for k in barriers}
    pairs = len(names) * (len(names) - 1) // 2
    forwards = {"loop": pairs * len(alphas), "shared": len(names) + pairs * interior,
                "grouped": len(names) + pairs * interior, "cached": len(names) + pairs * interior}
    rows = [(k, f"{timings[k]:.1f}", forwards[k] * args.n, f"{timings['loop'] / timings[k]:.2f}x", f"{agree[k]:.1e}")
            for k in timings]
    print(f"{len(names)} runs, {pairs} pairs, alphas {alphas}, {args.n} examples per point, device {cfg.device}")
    print(table(rows, ("method", "seconds", "example evaluations", "speed-up vs loop", "max |barrier - loop's|")))
    path = write_json(args.out, {"runs": names, "pairs": pairs, "alphas": alphas, "n_examples": args.n,
                                 "device": cfg.device, "seconds": timings, "example_evaluations":
                                 {k: forwards[k] * args.n for k in forwards}, "max_barrier_difference": agree,
                                 "machine_before": before, "machine_after": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
