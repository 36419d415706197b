"""Batch-size scaling experiment on the embedded model: LoRA + AdamW on sentiment at batch B and
at kappa * B under the square-root rule, with lr unchanged (naive) and with the linear rule.

Prints a table (final dev accuracy, distance of each curve to the base run's) and writes
``benchmarks/results/study_scaling.json`` and ``study_scaling.png``. Resumable: rerunning the
same command reuses finished runs (the run folders are under ``--output-dir``).

    python benchmarks/scaling_experiment.py                       # 2-core CPU, ~10-15 min
    python benchmarks/scaling_experiment.py --device cuda --steps 400 --eval-every 40 --n-dev 500
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ftlab.config import TrainConfig, load_config
from ftlab.scaling.experiment import ScalingExperimentConfig, noise_line, run_experiment

from _common import RESULTS, clock, machine, table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kappa", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=32, help="steps of the base run (batch B)")
    p.add_argument("--eval-every", type=int, default=8, help="base-run steps between dev evaluations")
    p.add_argument("--n-dev", type=int, default=64)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--n-probe", type=int, default=16, help="examples for the gradient-noise check")
    p.add_argument("--variants", nargs="+", default=["rule", "naive", "linear"], help="kappa B runs to compare")
    p.add_argument("--output-dir", default="runs/bench-scaling")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--name", default="study_scaling", help="stem of the JSON and PNG under --results")
    args = p.parse_args()

    train = load_config(TrainConfig, None, [
        "model=smollm2-135m", f"device={args.device}", "data.task=sentiment", "data.n_train=1000",
        f"data.n_dev={args.n_dev}", f"data.n_test={args.n_test}", "mode=lora", "lora.r=8", "lora.alpha=16",
        "optimizer=adamw", f"lr={args.lr}", "max_grad_norm=null", f"steps={args.steps}",
        f"batch_size={args.batch_size}", f"eval_every={args.eval_every}", f"checkpoint_every={args.eval_every}",
        "eval_batch_size=32"])
    exp = ScalingExperimentConfig(train=train, kappa=args.kappa, variants=args.variants, n_probe=args.n_probe,
                                  output_dir=args.output_dir)
    with clock() as c:
        result = run_experiment(exp)
    seconds = c.seconds
    rows = []
    for name, h in result["hyperparameters"].items():
        c, d = result["curves"][name], result["distance"].get(name)
        betas = [round(b, 4) for b in h["betas"] or [0.9, 0.999]]
        rows.append((name, str(h["batch_size"]), f"{h['lr']:.3g}", str(betas),
                     f"{h['eps'] if h['eps'] is not None else 1e-8:.3g}", f"{c['dev'][-1]:.4f}",
                     f"{c['dev_loss'][-1]:.4f}" if "dev_loss" in c else "-",
                     f"{d['dev_mean_abs']:.4f}" if d else "-",
                     f"{d['dev_loss_mean_abs']:.4f}" if d and "dev_loss_mean_abs" in d else "-",
                     f"{d['loss_mean_abs']:.4f}" if d else "-"))
    print(table(rows, ("run", "batch", "lr", "betas", "eps", "final dev acc", "final dev loss",
                       "dev-acc distance", "dev-loss distance", "train-loss distance")))
    for where, n in (result["noise"] or {}).items():
        if isinstance(n, dict):
            print(f"noise check at {where}: {noise_line(n)}")
    print(f"{seconds:.0f} s")
    write_json(args.results.absolute() / f"{args.name}.json", {**result, "seconds": seconds, "machine": machine()})
    shutil.copyfile(Path(args.output_dir) / "experiment.png", args.results / f"{args.name}.png")


if __name__ == "__main__":
    main()
