"""The TinT evaluation table (few-shot classification + language modelling) on SmolLM2-135M.

    nice -n 10 .venv/bin/python benchmarks/tint_eval.py [key=value ...]   # overrides of configs tint-eval

Runs ``ftlab.tint.experiment.run_eval`` (resumable, into output_dir) and copies the summary with
the machine's state, the report and the figure into benchmarks/results/<output folder name>.{json,md,png}
(runs/tint-eval -> tint_eval.*)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch  # noqa: E402

from _common import RESULTS, machine, write_json


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
    name = Path(cfg.output_dir).name.replace("-", "_")  # runs/tint-eval -> tint_eval.json, .md, .png
    write_json(f"{name}.json", {"config": vars(cfg), "machine_before": before, "machine_after": machine(),
                                "wall_seconds": time.perf_counter() - t0, "summary": summary})
    shutil.copyfile(Path(cfg.output_dir) / "report.md", RESULTS / f"{name}.md")
    shutil.copyfile(Path(cfg.output_dir) / "tint_eval.png", RESULTS / f"{name}.png")
    print((Path(cfg.output_dir) / "report.md").read_text())


if __name__ == "__main__":
    main()
