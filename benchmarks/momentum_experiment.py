"""The momentum experiment (``ftlab scale momentum``) at the scale this CPU allows, as tables.

    python benchmarks/momentum_experiment.py [key=value overrides of configs scale-momentum]

Runs (or, when finished, reads) ``ftlab.scaling.momentum.run_momentum_experiment`` with the
packaged config ``scale-momentum`` into ``runs/bench-momentum`` (override ``output_dir=...``),
prints the distances and metrics as Markdown, and writes
``benchmarks/results/momentum_experiment.{json,png}``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine, write_json  # noqa: E402


def markdown(result: dict) -> str:
    from ftlab.scaling.compare import fmt_ci
    from ftlab.scaling.momentum import VARIANTS

    lines = ["| eta | run | lr | momentum | dev-loss distance to momentum | train-loss distance | final dev loss | "
             "best dev acc | test acc |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in result["lrs"].items():
        for v in VARIANTS:
            d = e["distance"].get(f"momentum_to_{v}", {})
            lines.append(f"| {name[2:]} | {v} | {e['lr'][v]:.3g} | {result['beta'] if v == 'momentum' else 0} | "
                         f"{fmt_ci(d['dev_loss_mean_abs'], 4) if d else '-'} | "
                         f"{fmt_ci(d['loss_mean_abs'], 4) if d else '-'} | "
                         f"{fmt_ci(e['final_dev_loss'][v], 4)} | {fmt_ci(e['best_dev'][v])} | {fmt_ci(e['test'][v])} |")
        lines.append(f"| {name[2:]} | **ratio** effective/plain | | | **{e['ratio_dev_loss']:.3f}** | "
                     f"**{e['ratio_train_loss']:.3f}** | | | |")
    return "\n".join(lines)


def main() -> None:
    from ftlab.config import load_config
    from ftlab.configs import packaged_config
    from ftlab.scaling.momentum import MomentumExperimentConfig, run_momentum_experiment

    exp = load_config(MomentumExperimentConfig, packaged_config("scale-momentum"),
                      ["output_dir=runs/bench-momentum", *sys.argv[1:]])
    before, started = machine(), time.perf_counter()
    result = run_momentum_experiment(exp, progress=True)
    print(markdown(result))
    write_json("momentum_experiment.json", {"machine_before": before, "machine_after": machine(),
                                            "wall_s": time.perf_counter() - started, "markdown": markdown(result),
                                            **{k: v for k, v in result.items()}})
    shutil.copyfile(Path(exp.output_dir) / "momentum.png", RESULTS / "momentum_experiment.png")


if __name__ == "__main__":
    main()
