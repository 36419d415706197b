"""First-order training throughput: 2 data-parallel processes (DDP, gloo) against 1 process on this
CPU, and Local SGD (H = 4) on the same 2 processes.

    python benchmarks/ddp_throughput.py --modes lora --batch 8 --steps 8

Each configuration runs ``ftlab.train`` (the real loop: SmolLM2-135M, movie-review sentiment,
SGD, no dev/test evaluation, one checkpoint at the end) in a fresh process tree, one after the
other:

* ``1 process``: ``OMP_NUM_THREADS=2`` (both cores), the whole global batch;
* ``2 processes (DDP)``: ``torchrun --nproc_per_node 2``, 1 thread each, half the batch each,
  gradients all-reduced every step;
* ``2 processes (Local SGD, H=4)``: the same, weights averaged every 4 steps instead.

Step times are the wall time between consecutive step callbacks on rank 0, median over the steps
after ``--warmup``; examples/s = global batch / median step time. The machine's load is recorded
before and after (the machine is shared). Writes benchmarks/results/ddp_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, table, write_json  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One run of ftlab.train; rank 0 writes its step times to ``args.out``."""
    import torch

    from ftlab.config import TrainConfig, load_config
    from ftlab.distributed import is_main, shutdown
    from ftlab.train import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(TrainConfig, None, [
        f"mode={args.mode}", "optimizer=sgd", f"lr={1e-3 if args.mode == 'full' else 0.1}", f"batch_size={args.batch}",
        f"steps={args.steps}", "eval_every=0", "checkpoint_every=0", "data.n_train=256", "data.n_dev=0",
        "data.n_test=0", f"output_dir={args.run_dir}", *args.extra])
    stamps = []
    train(cfg, progress=False, callback=lambda step, record: stamps.append(time.perf_counter()))
    if is_main():
        Path(args.out).write_text(json.dumps(stamps))
    shutdown()


def run(mode: str, procs: int, extra: list[str], args: argparse.Namespace, folder: Path) -> dict:
    name = f"{mode}-{procs}-{'-'.join(extra) or 'ddp'}"
    out, run_dir = folder / f"{name}.json", folder / name
    cmd = [__file__, "--worker", "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps),
           "--out", str(out), "--run-dir", str(run_dir), *[f"--extra={e}" for e in extra]]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs), "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={procs}"]
    started = time.perf_counter()
    subprocess.run([*launcher, *cmd], check=True, env=env, capture_output=True, text=True)
    stamps = json.loads(out.read_text())
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]
    median = statistics.median(steps)
    variant = "Local SGD H=4" if extra else ("DDP" if procs > 1 else "single")
    return {"mode": mode, "processes": procs, "variant": variant,
            "median_step_s": median, "examples_per_s": args.batch / median, "steps_timed": len(steps),
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora")
    parser.add_argument("--modes", default="lora", help="comma-separated: lora, full, prefix")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--run-dir")
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    before = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for procs, extra in ((1, []), (2, []), (2, ["local_sgd.period=4"])):
                rows.append(run(mode, procs, extra, args, Path(tmp)))
                print(f"{rows[-1]['mode']} {rows[-1]['variant']}: {rows[-1]['examples_per_s']:.2f} examples/s",
                      flush=True)
    single = {r["mode"]: r["examples_per_s"] for r in rows if r["processes"] == 1}
    for r in rows:
        r["vs_single"] = r["examples_per_s"] / single[r["mode"]]
    print(table([(r["mode"], r["variant"], r["processes"], r["median_step_s"], r["examples_per_s"], r["vs_single"])
                 for r in rows], ("mode", "run", "processes", "median step s", "examples/s", "vs 1 process")))
    path = write_json("ddp_throughput.json", {"machine_before": before, "machine_after": machine(),
                                              "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                                              "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
