"""Basins and OOD prediction on the embedded SmolLM2-135M (Juneja et al., ICLR 2023), sized for a
shared 2-core CPU: the 16 LoRA runs of the packaged config seeds-sentiment-ood (sentiment trained on
movie-review snippets; data order and LoRA init varied), each evaluated out of domain on tweets,
Amazon reviews and NYT editorials (sentiment_tweets, sentiment_amazon, sentiment_nyt), then the
topography: barrier matrices, basins, sharpness, the loss surface and the prediction table with the
verdict. (benchmarks/results/seed_basins/ holds the earlier study of BIG-bench NLI, seeds-nli-basins.)

Resumable (finished runs, per-run and per-pair results are cached in the study folder). Train the
runs first, in parallel processes if you like, then measure:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 3 -m ftlab.cli seeds run -c seeds-sentiment-ood
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 3 benchmarks/seed_basins.py
    python benchmarks/seed_basins.py          # one process; also trains what is missing

Writes ``benchmarks/results/seed_sentiment_ood/{seed_basins.json, report.md, heatmap.png, surface.png,
prediction.png}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from ftlab.config import load_config
from ftlab.configs import packaged_config
from ftlab.distributed import shutdown
from ftlab.seeds import SeedStudyConfig, run_study
from ftlab.seeds.topography import TopographyConfig, topography

from _common import RESULTS, machine, table, write_json

CONFIG = packaged_config("seeds-sentiment-ood")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alphas", default="0,0.5,1")
    p.add_argument("--n-path", type=int, default=24, help="train and OOD examples per path point")
    p.add_argument("--group", type=int, default=4, help="points per forward")
    p.add_argument("--surface-points", type=int, default=5, help="loss-surface grid points per axis")
    p.add_argument("--n-curvature", type=int, default=16, help="training examples for sharpness and the trace")
    p.add_argument("--hutchinson-samples", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "seed_sentiment_ood")
    args = p.parse_args()
    study = load_config(SeedStudyConfig, CONFIG, [])
    before = machine()
    start = time.perf_counter()
    records = run_study(study, progress=False)
    trained = time.perf_counter() - start
    cfg = TopographyConfig(alphas=[float(x) for x in args.alphas.split(",")], n_train=args.n_path, n_ood=args.n_path,
                           batch_size=24, group=args.group, surface_points=args.surface_points, sharpness_steps=3,
                           hutchinson_samples=args.hutchinson_samples, n_curvature=args.n_curvature, n_boot=1000,
                           n_perm=5000)
    start = time.perf_counter()
    report = topography(study.output_dir, cfg, Path(study.output_dir) / "topography", progress=True)
    measured = time.perf_counter() - start
    shutdown()
    if report is None:  # not rank 0
        return
    rows = [(r["target"], r["predictor"], r["n_runs"], f"{r['estimate']:+.3f}", f"[{r['low']:+.3f}, {r['high']:+.3f}]",
             f"{r['p']:.3g}", "yes" if r["significant"] else "no") for r in report["prediction"]]
    print(table(rows, ("target", "predictor", "runs", "estimate", "95% CI", "perm. p", "significant")))
    print(report["verdict"])
    args.out.mkdir(parents=True, exist_ok=True)
    src = Path(study.output_dir) / "topography"
    for name in ("report.md", "heatmap.png", "surface.png", "prediction.png"):
        shutil.copyfile(src / name, args.out / name)
    write_json(args.out / "seed_basins.json", {
        **report,
        "seconds": {"train_and_evaluate (0 if trained before)": trained, "topography": measured},
        "processes": int(os.environ.get("WORLD_SIZE", "1")), "runs": len(records),
        "machine_before": before, "machine_after": machine()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
