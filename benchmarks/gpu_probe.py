"""The probe table at full size on one GPU (H100/H200; < 3 min with the three BIG-bench-era tasks,
not re-timed on these four): for the classification tasks of benchmarks/quality.py (sentiment, boolq,
trec, siqa), 1000 train / 200 dev / 1000 test (siqa, 1930 examples, scaled to 877/175/877), each task's
max_length from quality.py's TASK_SETTINGS (boolq 384, else 128), k = all, 16, 64 per class (trec:
all, 8; its abbreviation class has 15 training examples) with 3 seeds, probes on f(s), Phi p_f(s),
p_f(s) on the label words and the middle layer, zero-shot and the R^2 check; then the LP rows of
benchmarks/quality.py on the same splits.

    PYTHONPATH=src python benchmarks/gpu_probe.py --out $OUT            # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_probe.py --out /tmp/gp --small  # CPU smoke test (sentiment, 16/8/16)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULTS, TASK_SETTINGS  # noqa: E402

from _common import machine  # noqa: E402

TASKS = {"sentiment": "[0,16,64]", "boolq": "[0,16,64]", "trec": "[0,8]", "siqa": "[0,16,64]"}  # task -> k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU, to test the script")
    args = ap.parse_args()
    import torch

    from ftlab.config import load_config
    from ftlab.probe.experiment import ProbeConfig, run_probe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (["n_train=16", "n_dev=8", "n_test=16", "seeds=[0]"] if args.small else
             ["n_train=1000", "n_dev=200", "n_test=1000", "seeds=[0,1,2]"])
    report = {"machine_start": machine(), "tasks": {}}
    tasks = ("sentiment",) if args.small else tuple(TASKS)
    for task in tasks:
        k = "[0,2]" if args.small else TASKS[task]
        max_length = TASK_SETTINGS.get(task, {}).get("max_length", DEFAULTS["max_length"])  # as quality.py's LP row
        cfg = load_config(ProbeConfig, None, [f"task={task}", f"device={device}", f"k={k}", "batch_size=64",
                                              "chunk_rows=512", "kinds=[f,phi_p,p_words,layer]",
                                              f"max_length={max_length}", f"output_dir={out / ('probe-' + task)}",
                                              *sizes])
        t = time.perf_counter()
        result = run_probe(cfg)
        result["seconds"] = round(time.perf_counter() - t, 1)
        report["tasks"][task] = {k: v for k, v in result.items() if k != "rows"}
        print(json.dumps({"task": task, "seconds": result["seconds"], "summary": result["summary"],
                          "theory": result.get("theory")}), flush=True)
    quality = [sys.executable, str(Path(__file__).with_name("quality.py")), "--device", device, "--tasks",
               *tasks, "--methods", "linear-probe", "--results", str(out / "quality"),
               "--runs", str(out / "runs")]
    quality += ["--n-train", "16", "--n-dev", "8", "--n-test", "16"] if args.small else ["--n-dev", "200",
                                                                                        "--n-test", "1000"]
    t = time.perf_counter()
    subprocess.run(quality, check=True)
    report["quality_lp_seconds"] = round(time.perf_counter() - t, 1)
    report["machine_end"] = machine()
    (out / "gpu_probe.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written to {out / 'gpu_probe.json'}")


if __name__ == "__main__":
    main()
