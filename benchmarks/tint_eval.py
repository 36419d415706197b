"""The TinT evaluation table (few-shot classification + language modelling) on SmolLM2-135M.

    nice -n 10 .venv/bin/python benchmarks/tint_eval.py [key=value ...]   # overrides of configs tint-eval

Runs ``ftlab.tint.experiment.run_eval`` (resumable, into output_dir) and copies the summary with
the machine's state into benchmarks/results/tint_eval.json."""

from __future__ import annotations

import sys
import time

import torch  # noqa: E402

from _common import machine, write_json


def main() -> None:
    torch.set_num_threads(1)  # the 2-core machine is shared: one thread per process spins least
    from ftlab.config import load_config
    from ftlab.configs import packaged_config
    from ftlab.tint.experiment import TintEvalConfig, run_eval

    cfg = load_config(TintEvalConfig, packaged_config("tint-eval"), sys.argv[1:])
    before = machine()
    t0 = time.perf_counter()
    summary = run_eval(cfg, progress=lambda what, i, n: print(f"{time.strftime('%H:%M:%S')} {what}: {i}/{n}",
                                                              flush=True))
    write_json("tint_eval.json", {"config": vars(cfg), "machine_before": before, "machine_after": machine(),
                                  "wall_seconds": time.perf_counter() - t0, "summary": summary})
    print(open(f"{cfg.output_dir}/report.md").read())


if __name__ == "__main__":
    main()
