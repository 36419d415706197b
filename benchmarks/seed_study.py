"""Seed study on the embedded model and sentiment: >= 10 first-order LoRA (AdamW) runs and >= 10
MeZO LoRA runs, varying data order, LoRA init and MeZO perturbation seeds one at a time and all
at once, then the report (multi-bootstrap CIs, expected max dev accuracy, variance shares,
interpolation barriers).

Writes ``benchmarks/results/study_seeds.{json,md,png}``. Resumable: rerunning the command skips
finished runs and cached barriers (run folders under ``--output-dir``).

    python benchmarks/seed_study.py                      # sized for a shared 2-core CPU
    python benchmarks/seed_study.py --device cuda --steps 200 --batch-size 16 --n-train 1000 \\
        --n-test 1000 --n-dev 200 --mezo-steps 4000 --runs 8 --output-dir runs/bench-seeds-gpu
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ftlab.config import load_config
from ftlab.io import atomic_write_json
from ftlab.seeds import SeedStudyConfig, run_study
from ftlab.seeds.report import build_report

from _common import table

RESULTS = Path(__file__).resolve().parent / "results"


def _study(args: argparse.Namespace, name: str, optimizer: list[str], kinds: str, steps: int,
           runs_per_kind: int, runs_all: int) -> SeedStudyConfig:
    return load_config(SeedStudyConfig, None, [
        f"output_dir={Path(args.output_dir) / name}", f"kinds={kinds}", f"runs_per_kind={runs_per_kind}",
        f"runs_all={runs_all}", "train.model=smollm2-135m", f"train.device={args.device}", "train.data.task=sentiment",
        f"train.data.n_train={args.n_train}", f"train.data.n_dev={args.n_dev}", f"train.data.n_test={args.n_test}",
        "train.mode=lora", "train.lora.r=8", "train.lora.alpha=16", f"train.steps={steps}",
        f"train.batch_size={args.batch_size}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        "train.eval_batch_size=32", *[f"train.{o}" for o in optimizer]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8, help="first-order steps per run")
    p.add_argument("--mezo-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-dev", type=int, default=16)
    p.add_argument("--n-test", type=int, default=48)
    p.add_argument("--runs", type=int, default=4, help="seed values per kind (and in the 'all' group)")
    p.add_argument("--pairs", type=int, default=1, help="interpolation pairs per study")
    p.add_argument("--output-dir", default="runs/bench-seeds")
    p.add_argument("--only", choices=["lora-adamw", "lora-mezo"],
                   help="train this study's runs only, without the report (to run the two studies in parallel)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()

    studies = [
        # order + init, 'runs' values each plus 'runs' at once: 1 + 3 (runs - 1) = 10 runs for runs = 4.
        _study(args, "lora-adamw", ["optimizer=adamw", "lr=1e-3"], "[order, init]", args.steps, args.runs, args.runs),
        # order + init + zo, runs - 1 values each, plus runs at once: 1 + 3 (runs - 2) + (runs - 1) = 10 for runs = 4.
        _study(args, "lora-mezo", ["optimizer=mezo", "lr=1e-3", "zo.eps=1e-2"], "[order, init, zo]", args.mezo_steps,
               args.runs - 1, args.runs),
    ]
    start = time.perf_counter()
    timings = {}
    for study in studies:
        if args.only and Path(study.output_dir).name != args.only:
            continue
        t = time.perf_counter()
        records = run_study(study)
        timings[study.output_dir] = time.perf_counter() - t
        print(f"{study.output_dir}: {len(records)} runs")
    if args.only:
        return
    t = time.perf_counter()
    out = Path(args.output_dir) / "report"
    report = build_report([s.output_dir for s in studies], out, n_boot=2000, barrier_pairs=args.pairs,
                          alphas=(0.0, 0.5, 1.0), progress=True)
    timings["report"] = time.perf_counter() - t
    rows = [(s["label"], str(s["test"]["n"]), f"{s['test']['mean']:.4f}", f"{s['test']['std']:.4f}",
             f"[{s['multi_bootstrap']['low']:.4f}, {s['multi_bootstrap']['high']:.4f}]",
             f"{s['expected_max']['mean'][-1]:.4f}") for s in report["studies"]]
    print(table(rows, ("method", "runs", "test mean", "std", "multi-bootstrap 95% CI", "E[max dev] n=N")))
    print((out / "report.md").read_text())
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s")
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "study_seeds.json",
                      {**report, "seconds": timings, "args": {**vars(args), "results": str(args.results)}})
    shutil.copyfile(out / "report.md", args.results / "study_seeds.md")
    shutil.copyfile(out / "report.png", args.results / "study_seeds.png")


if __name__ == "__main__":
    main()
