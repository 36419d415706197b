"""The Local SGD experiment (``ftlab scale local-sgd``) on 2 CPU processes, as a table.

    python benchmarks/local_sgd_experiment.py [key=value overrides of configs scale-local-sgd]

Launches ``torchrun --standalone --nproc_per_node 2 -m ftlab.cli scale local-sgd -c
scale-local-sgd output_dir=runs/bench-local-sgd`` (1 thread per process; resumable, finished runs
are read), prints the comparison as Markdown and writes
``benchmarks/results/local_sgd_experiment.{json,png}``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine, write_json  # noqa: E402


def markdown(result: dict) -> str:
    from ftlab.scaling.compare import fmt_ci

    lines = ["| run | comm rounds | vs sync | dev-loss distance to sync | final dev loss | best dev acc | test acc |",
             "|---|---|---|---|---|---|---|"]
    for v, rounds in result["comm_rounds"].items():
        d = result["distance_to_sync"].get(v, {}).get("dev_loss_mean_abs")
        lines.append(f"| {v} | {rounds['mean']:.0f} | {result['rounds_vs_sync'][v]:.3f} | "
                     f"{fmt_ci(d, 4) if d else '-'} | {fmt_ci(result['final_dev_loss'][v], 4)} | "
                     f"{fmt_ci(result['best_dev'][v])} | {fmt_ci(result['test'][v])} |")
    return "\n".join(lines)


def main() -> None:
    out = "runs/bench-local-sgd"
    overrides = [f"output_dir={out}", *sys.argv[1:]]
    for o in sys.argv[1:]:
        if o.startswith("output_dir="):
            out = o.split("=", 1)[1]
    before, started = machine(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "ftlab.cli", "scale", "local-sgd", "-c", "scale-local-sgd", *overrides], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads((Path(out) / "local_sgd.json").read_text())
    print(markdown(result))
    write_json("local_sgd_experiment.json", {"machine_before": before, "machine_after": machine(),
                                             "wall_s": time.perf_counter() - started, "markdown": markdown(result),
                                             **result})
    shutil.copyfile(Path(out) / "local_sgd.png", RESULTS / "local_sgd_experiment.png")


if __name__ == "__main__":
    main()
