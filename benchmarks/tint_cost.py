"""TinT size and cost beside the inner model (SmolLM2-135M), and the float32 equality check.

    nice -n 10 .venv/bin/python benchmarks/tint_cost.py            # P = 64 and 192, k = 1, 128 tokens

Each layout is measured in its own process (peak resident memory is per process)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch  # noqa: E402

from _common import machine, table, write_json

LAYOUTS = [(64, 1), (192, 1)]


def one(n_prefixes: int, k: int) -> dict:
    from ftlab.config import from_dict
    from ftlab.tint.costs import TintBuildConfig, measure

    cfg = from_dict(TintBuildConfig, {"tint": {"n_prefixes": n_prefixes, "k": k, "inner_lr": 1e-3},
                                      "n_tokens": 128, "n_train": 96, "repeats": 2})
    return measure(cfg)


def main() -> None:
    torch.set_num_threads(1)  # the 2-core machine is shared: one thread per process spins least
    if len(sys.argv) == 3:
        print(json.dumps(one(int(sys.argv[1]), int(sys.argv[2]))))
        return
    before = machine()
    results = {}
    for p, k in LAYOUTS:
        out = subprocess.run([sys.executable, __file__, str(p), str(k)], capture_output=True, text=True, check=True)
        results[f"P={p} k={k}"] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    first = next(iter(results.values()))
    rows.append(("inner SmolLM2-135M", f"{first['inner']['parameters']:,}", "", "",
                 f"{first['inner']['peak_mib_growth']:.0f}", f"{first['inner']['seconds']:.2f}", ""))
    for name, r in results.items():
        t = r["tint"]
        rows.append((f"TinT {name} (H={t['hidden_size']})", f"{t['prefix'] + t['buffers']:,}",
                     f"{t['dense_equivalent']:,}",
                     f"{t['prefix_tokens']:,}", f"{t['peak_mib_growth']:.0f}", f"{t['seconds']:.2f}",
                     f"{r['check']['max_abs_diff']:.1e} / {r['check']['logit_scale']:.0f}"))
    print(table(rows, ("model", "parameters", "dense-equivalent", "prefix tokens", "peak MiB added",
                       "s / forward (128 tok)", "max |diff| / logit scale")))
    write_json("tint_cost.json", {"machine_before": before, "machine_after": machine(), "results": results})


if __name__ == "__main__":
    main()
