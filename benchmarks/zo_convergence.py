"""One convergence harness for the zeroth-order estimators: every method on the same tasks, model,
batch, data order and evaluation, its lr chosen on dev from a small grid; dev accuracy and loss
against forward passes and against wall-clock, peak memory, and forwards-to-target.

    python benchmarks/zo_convergence.py --tasks sentiment trec boolq --seeds 0 1 2 --steps 2000
    python benchmarks/zo_convergence.py --quick            # a few steps of two methods, to check it runs

Protocol, per task:
1. lr tuning: every method runs with seed 0 at each lr of its grid (``GRIDS``); the lr with the best
   final dev accuracy is kept (ties: the smaller lr).
2. the kept lr runs for every seed (seed 0 reused). Every run of a task shares its splits (data seed 0)
   and batch order (the run's seed): methods differ only in how they step.
3. forwards are counted as batch forwards: a zeroth-order step costs its optimizer's
   ``forwards_per_step`` (MeZO-SVRG's full-batch steps their full-batch forwards: ``forward_counter``);
   an AdamW step 3 (forward + backward, the backward about two forwards).
4. the target is plain MeZO's final dev accuracy (mean over seeds, at ``--steps``); each method's
   forwards-to-target is the first dev evaluation whose mean over seeds reaches it.

Every run is a ``ftlab train`` run folder under ``<out>/<task>/<method>/lr<lr>/seed<s>``, run in a
fresh process (its peak RSS is its own) and resumed, or skipped when finished, by a rerun. Writes
``benchmarks/results/zo_convergence.json``, prints a markdown table, and draws
``benchmarks/results/zo_convergence.png`` (mean dev accuracy against forwards, one panel a task).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from _common import RESULTS, machine, table, write_json

# Per method: (optimizer, extra overrides, lr grid). LoRA r=8 on the embedded model throughout;
# eps 1e-2 for LoRA as MeZO's paper uses. AdamW-LoRA is the first-order reference row.
MEZO_LRS = [3e-3, 1e-3, 3e-4, 1e-4]
GRIDS: dict[str, tuple[str, list[str], list[float]]] = {
    "mezo": ("mezo", ["zo.eps=1e-2"], MEZO_LRS),
    "zo-adam": ("zo-adam", ["zo.eps=1e-2"], [1e-3, 3e-4, 1e-4]),
    "fzoo": ("fzoo", ["zo.eps=1e-2", "zo.distribution=rademacher", "zo.n_perturbations=8"], [1e-3, 3e-4, 1e-4]),
    "fzoo-batched": ("fzoo", ["zo.eps=1e-2", "zo.distribution=rademacher", "zo.n_perturbations=8",
                              "zo.batched=true"], [1e-3, 3e-4, 1e-4]),
    "hizoo": ("hizoo", ["zo.eps=1e-2"], MEZO_LRS),
    "lozo": ("lozo", ["zo.eps=1e-2", "zo.rank=2"], MEZO_LRS),
    "lozo-m": ("lozo-m", ["zo.eps=1e-2", "zo.rank=2"], MEZO_LRS),
    "zo-guided": ("zo-guided", ["zo.eps=1e-2", "zo.pool_size=16"], MEZO_LRS),
    "lowrank-fzoo": ("lowrank-fzoo", ["zo.eps=1e-2", "zo.n_perturbations=8", "zo.rank=2", "zo.refresh_every=5",
                                      "zo.momentum=0.5"], [1e-3, 3e-4, 1e-4]),
    # MeZO-SVRG: a full-batch estimate over 64 fixed examples every 5 steps (its forwards counted)
    "mezo-svrg": ("mezo-svrg", ["zo.eps=1e-2", "zo.svrg_every=5", "zo.svrg_batch=64"], MEZO_LRS),
    "adamw": ("adamw", [], [1e-3, 3e-4]),
}
FIRST_ORDER_FORWARDS = 3  # forward + backward per step, in forward-equivalents
COMMON = ["mode=lora", "lora.r=8", "lora.alpha=16", "data.max_length=128", "max_grad_norm=null"]


def forward_counter(optimizer: str, overrides: list[str], batch_size: int) -> Callable[[int], float]:
    """``forwards(s)``: the batch forwards of a run's first ``s`` steps, as the optimizer itself
    counts them (``forwards_per_step``). MeZO-SVRG's full-batch steps (the first, then every
    ``svrg_every``-th) cost MeZO's forwards over ``svrg_batch`` examples each, i.e. that many
    times ``svrg_batch / batch_size`` batch forwards, instead of an SVRG step's."""
    import torch

    from ftlab.config import TrainConfig, load_config
    from ftlab.optim import is_zeroth_order
    from ftlab.zo import build_zo_optimizer

    if not is_zeroth_order(optimizer):
        return lambda s: s * FIRST_ORDER_FORWARDS
    cfg = load_config(TrainConfig, None, [f"optimizer={optimizer}", *overrides])
    probe = build_zo_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(4, 4))], 1e-3, cfg.zo, 0)
    per_step = probe.forwards_per_step
    if not getattr(probe, "needs_full_batch", False):
        return lambda s: s * per_step
    full = super(type(probe), probe).forwards_per_step * probe.svrg_batch / batch_size  # MeZO's, on the full batch

    def forwards(s: int) -> float:
        n_full = -(-s // probe.svrg_every)  # steps 0, q, 2q, ... among the first s
        return n_full * full + (s - n_full) * per_step

    return forwards


def steps_within(forwards: Callable[[int], float], budget: int) -> int:
    """The most steps whose forwards fit in ``budget`` (at least 1)."""
    steps = 1
    while forwards(steps + 1) <= budget:
        steps += 1
    return steps


def worker(spec_path: str) -> None:
    """One run, in this process: train, then record its wall-clock per step and peak memory."""
    from ftlab.config import TrainConfig, load_config
    from ftlab.memory import PeakMemory
    from ftlab.train import train

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(TrainConfig, None, spec["overrides"])
    times: dict[int, float] = {}
    start = time.perf_counter()
    memory = PeakMemory().start()
    results = train(cfg, progress=False, callback=lambda step, record: times.__setitem__(step, time.perf_counter()))
    out = Path(cfg.output_dir) / "harness.json"
    if times:  # a run that did steps now (a finished one is only read back)
        out.write_text(json.dumps({"peak_bytes": memory.peak(), "seconds": time.perf_counter() - start,
                                   "step_seconds": {s: t - start for s, t in times.items()}, "results": results}))


def run(task: str, method: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    """The run's curve (dev accuracy and loss by step), its test result, seconds and peak memory."""
    optimizer, extra, _ = GRIDS[method]
    folder = Path(args.out) / task / method / f"lr{lr:g}" / f"seed{seed}"
    forwards = forward_counter(optimizer, [*extra, f"lr={lr}"], args.batch_size)
    steps = steps_within(forwards, args.forwards) if args.forwards else args.steps  # the same forward budget for all
    overrides = [*COMMON, f"batch_size={args.batch_size}", *extra, f"optimizer={optimizer}", f"lr={lr}",
                 f"seed={seed}", f"data.task={task}",
                 f"data.n_train={args.n_train}", f"data.n_dev={args.n_dev}", f"data.n_test={args.n_test}",
                 "data.data_seed=0", f"steps={steps}", f"eval_every={max(1, steps // args.evals)}",
                 f"checkpoint_every={max(1, steps // args.evals)}", f"output_dir={folder}",
                 f"model={args.model}", f"device={args.device}"]
    if not (folder / "harness.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        spec = folder.parent / f".seed{seed}.spec.json"
        spec.write_text(json.dumps({"overrides": overrides}))
        subprocess.run([sys.executable, __file__, "--worker", str(spec)], check=True)
    from ftlab.rundir import RunDir

    harness = json.loads((folder / "harness.json").read_text())
    dev = RunDir(folder).read_metrics(split="dev")
    return {"task": task, "method": method, "lr": lr, "seed": seed, "forwards_per_step": forwards(steps) / steps,
            "curve": [{"step": r["step"], "forwards": forwards(r["step"]), "accuracy": r.get("accuracy"),
                       "loss": r.get("loss"), "seconds": harness["step_seconds"].get(str(r["step"]))} for r in dev],
            "test": (harness["results"].get("test") or {}).get("accuracy"), "peak_bytes": harness["peak_bytes"],
            "seconds": harness["seconds"]}


def _final(r: dict) -> float:
    return r["curve"][-1]["accuracy"] if r["curve"] else float("-inf")


def _mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [c["forwards"] for c in runs[0]["curve"]]
    return [(f, sum(r["curve"][i]["accuracy"] for r in runs) / len(runs)) for i, f in enumerate(steps)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tasks", nargs="+", default=["sentiment", "trec", "boolq"])
    p.add_argument("--methods", nargs="+", default=list(GRIDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000, help="steps of every method (without --forwards)")
    p.add_argument("--forwards", type=int, default=None,
                   help="a forward budget instead: each method runs budget / its forwards a step steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--evals", type=int, default=10, help="dev evaluations per run")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/zo-convergence")
    p.add_argument("--grid", type=int, default=None, help="only the first N lrs of each method's grid (a CPU budget)")
    p.add_argument("--quick", action="store_true", help="4 steps, 2 methods, 1 seed, 1 lr each: checks the harness")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.methods, args.seeds, args.steps, args.evals = ["mezo", "adamw"], [0], 4, 2
        args.n_train, args.n_dev, args.n_test, args.tasks = 32, 16, 16, args.tasks[:1]
        args.forwards, args.grid = None, 1
    unknown = [m for m in args.methods if m not in GRIDS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(GRIDS)}")
    if args.grid:
        for m in args.methods:
            GRIDS[m] = (GRIDS[m][0], GRIDS[m][1], GRIDS[m][2][:args.grid])

    before = machine()
    report: dict = {"args": vars(args), "machine_before": before, "tasks": {}}
    rows = []
    for task in args.tasks:
        chosen: dict[str, list[dict]] = {}
        tuning: dict[str, dict[str, float]] = {}
        for method in args.methods:
            grid = GRIDS[method][2]
            first = [run(task, method, lr, args.seeds[0], args) for lr in grid]
            tuning[method] = {f"{r['lr']:g}": _final(r) for r in first}
            best = max(first, key=lambda r: (_final(r), -r["lr"]))
            chosen[method] = [best] + [run(task, method, best["lr"], s, args) for s in args.seeds[1:]]
        target = sum(_final(r) for r in chosen["mezo"]) / len(chosen["mezo"]) if "mezo" in chosen else None
        mezo_forwards = chosen["mezo"][0]["curve"][-1]["forwards"] if "mezo" in chosen else None
        summary = {}
        for method, runs in chosen.items():
            curve = _mean_curve(runs)
            hit = next((f for f, acc in curve if target is not None and acc >= target), None)
            tests = [r["test"] for r in runs if r["test"] is not None]
            peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"]]
            summary[method] = {"lr": runs[0]["lr"], "final_dev": curve[-1][1], "forwards_to_target": hit,
                               "speedup_vs_mezo": (mezo_forwards / hit) if hit and mezo_forwards else None,
                               "test": sum(tests) / len(tests) if tests else None,
                               "peak_mib": max(peaks) / 2 ** 20 if peaks else None,
                               "seconds": sum(r["seconds"] for r in runs) / len(runs), "curve": curve,
                               "tuning": tuning[method]}
            s = summary[method]
            rows.append([task, method, f"{s['lr']:g}", s["final_dev"], s["test"], s["forwards_to_target"],
                         s["speedup_vs_mezo"], s["peak_mib"], s["seconds"]])
        report["tasks"][task] = {"target": target, "methods": summary, "runs": chosen}
    report["machine_after"] = machine()
    name = "zo_convergence_quick" if args.quick else "zo_convergence"  # a check of the harness keeps apart
    write_json(f"{name}.json", report)
    print(table(rows, ["task", "method", "lr", "dev", "test", "forwards to MeZO's final dev", "x vs MeZO",
                       "peak MiB", "s/run"], markdown=True))
    _plot(report, RESULTS / f"{name}.png")


def _plot(report: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return
    tasks = list(report["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = report["tasks"][task]
        for method, s in t["methods"].items():
            xs, ys = zip(*s["curve"]) if s["curve"] else ((), ())
            ax.plot(xs, ys, marker="o", ms=3, label=f"{method} (lr {s['lr']:g})")
        if t["target"] is not None:
            ax.axhline(t["target"], color="grey", ls="--", lw=1, label="MeZO's final dev")
        ax.set_xscale("symlog", linthresh=10)
        ax.set(title=task, xlabel="batch forwards", ylabel="dev accuracy (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
