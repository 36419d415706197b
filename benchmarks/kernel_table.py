"""The kernel-view table (Malladi et al., 2023, Table 1 style) on the embedded SmolLM2-135M.

For each task, k (per class) and seed, on the balanced k-shot train split and the fixed test set:

- zero-shot: argmax of the pre-trained label-word logits;
- eNTK-SGD / eNTK-sign, each with kernel regression (f0 offset) and SVM, over the LoRA
  parameters at their seeded initialisation (the kernel of "LoRA fine-tuning");
- fine-tuning with the repo's training loop: SGD and Adam(W), LoRA and full, with the
  diagnostics of :func:`ftlab.kernel.diagnostics.diagnose` (LoRA rows against the LoRA kernel;
  full rows get the linearisation error, and a kernel only with ``--full-kernel projected``).

Resumable per (task, k, seed) and per fine-tuning variant: results accumulate in
``benchmarks/results/kernel_table/<task>_k<k>_s<seed>.json``; runs and kernels live under
``--work``. ``--summary`` prints the table (mean and std over seeds) and writes
``benchmarks/results/kernel_table.json`` and ``kernel_table.png`` (kernel vs fine-tuning).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kernel_table.py --tasks sentiment --k 16 --seeds 0,1 --n-test 100
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kernel_table.py --summary
    # the issue's full grid, on a GPU (binary sentiment, 6-way question type as in Malladi et al.'s
    # TREC row, yes/no QA on a passage; boolq prompts are cut from the left to 256 tokens, 8% of them):
    python benchmarks/kernel_table.py --tasks sentiment,trec,boolq --k 16,64 --seeds 0,1,2,3,4 \\
        --n-test 1000 --steps 200 --device cuda --full-kernel projected
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ftlab.config import TrainConfig, load_config
from ftlab.kernel import KernelSpec, compute_kernel, readout_accuracy
from ftlab.kernel.diagnostics import diagnose
from ftlab.kernel.plots import accuracy_scatter
from ftlab.kernel.solvers import solve
from ftlab.models import load_model
from ftlab.train import build_trainer, load_run_data

from _common import RESULTS, clock, machine, read_json, table, write_json

VARIANTS = {"lora-sgd": ("lora", "sgd"), "lora-adamw": ("lora", "adamw"),
            "full-sgd": ("full", "sgd"), "full-adamw": ("full", "adamw")}


def config(args, task: str, k: int, seed: int, mode: str, optimizer: str = "sgd") -> TrainConfig:
    lr = getattr(args, f"lr_{mode}_{optimizer}")
    return load_config(TrainConfig, None, [
        f"data.task={task}", f"data.k_per_class={k}", "data.n_dev=0", f"data.n_test={args.n_test}",
        f"seed={seed}", f"mode={mode}", f"optimizer={optimizer}", f"lr={lr}", f"steps={args.steps}",
        f"batch_size={args.batch_size}", "eval_every=0", f"checkpoint_every={args.steps}", f"device={args.device}",
        "lora.r=8", "lora.alpha=16", f"output_dir={args.work}/{task}_k{k}_s{seed}/{mode}-{optimizer}/run"])


def run_group(args, task: str, k: int, seed: int) -> None:
    """All rows of one (task, k, seed), saving after each piece."""
    path = args.results / "kernel_table" / f"{task}_k{k}_s{seed}.json"
    record = read_json(path, {"task": task, "k": k, "seed": seed})
    base = config(args, task, k, seed, "lora")
    data = load_run_data(base)
    kspec = KernelSpec(params="trainable", output=args.output, chunk_size=args.chunk_size)
    identity = {"task": task, "k": k, "data_seed": 0}
    lora_kernels = Path(args.work) / f"{task}_k{k}_s{seed}" / "lora" / "kernels"
    if "kernel" not in record:
        model, tokenizer = load_model(base.model, device=args.device)
        module = build_trainer(base, model)[0].eval()
        # Same folder, spec and identity as diagnose() uses, so the LoRA runs reuse this kernel.
        with clock() as c:
            kd = compute_kernel(module, tokenizer, data.spec, data.splits.train, data.splits.test, kspec,
                                lora_kernels / "start", identity={"model": base.model, "mode": "lora", "seed": seed,
                                                                  **identity})
        record["kernel"] = {"seconds": c.seconds, "device": args.device, "machine": machine(),
                            "n_params": kd.manifest["n_params"],
                            "n_train": kd.n_train, "n_test": len(kd.manifest["test_ids"]),
                            "zero_shot": readout_accuracy(kd.f0_test, kd.tensors["readout"], kd.y_test)}
        for method in ("regression", "svm"):
            for kind in ("sgd", "sign"):
                sol = solve(kd, method, kind)
                record["kernel"][f"{kind}-{method}"] = {"accuracy": sol.accuracy, "ridge": sol.ridge, "note": sol.note}
        write_json(path, record)
    for name in args.ft.split(","):
        if name in record.get("finetune", {}):
            continue
        mode, optimizer = VARIANTS[name]
        cfg = config(args, task, k, seed, mode, optimizer)
        kernel_dir = lora_kernels if mode == "lora" else (
            Path(args.work) / f"{task}_k{k}_s{seed}" / "full" / "kernels" if args.full_kernel == "projected" else None)
        spec_for_mode = kspec if mode == "lora" else KernelSpec(params="trainable", output=args.output,
                                                                 projection_dim=args.projection_dim,
                                                                 chunk_size=args.full_chunk_size)
        with clock() as c:
            report, details = diagnose(cfg, data.spec, data.splits, kernel_dir, kspec=spec_for_mode,
                                       identity=identity, progress=True)
        # Re-read: another process may have added a variant of this group meanwhile.
        record = read_json(path)
        record.setdefault("finetune", {})[name] = {**report.to_dict(), "seconds": c.seconds, "machine": machine(),
                                                   "device": args.device, "zero_shot": details["zero_shot_accuracy"],
                                                   "lr": cfg.lr, "steps": cfg.steps}
        write_json(path, record)
        print(report.verdict(), flush=True)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary(results: Path, include: list[Path]) -> None:
    """Table over all saved groups (mean ± std over seeds; the seeds column says which seeds a
    row averages), JSON and the scatter plot, from ``results`` and the ``include`` folders."""
    records = [json.loads(p.read_text()) for folder in (results, *include)
               for p in sorted((folder / "kernel_table").glob("*.json"))]
    keys = [(r["task"], r["k"], r["seed"]) for r in records]
    if len(set(keys)) < len(keys):
        raise SystemExit(f"the same (task, k, seed) is saved in two results folders: "
                         f"{sorted({x for x in keys if keys.count(x) > 1})}; include each group once")
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        groups.setdefault((r["task"], r["k"]), []).append(r)
    rows, points = [], []
    for (task, k), recs in sorted(groups.items()):
        with_kernel = [r for r in recs if "kernel" in r]
        seeds = ",".join(str(r["seed"]) for r in with_kernel)
        kern = [r["kernel"] for r in with_kernel]
        rows.append((task, str(k), seeds, "zero-shot", mean_std([x["zero_shot"] for x in kern]), "", "", "", ""))
        for key in ("sgd-regression", "sgd-svm", "sign-regression", "sign-svm"):
            rows.append((task, str(k), seeds, f"eNTK-{key}", mean_std([x[key]["accuracy"] for x in kern]),
                         "", "", "", ""))
        for name in VARIANTS:
            done = [r for r in recs if name in r.get("finetune", {})]
            if not done:
                continue
            fts = [r["finetune"][name] for r in done]
            pick = lambda key, fts=fts: [f[key] for f in fts if f.get(key) is not None]  # noqa: E731
            rows.append((task, str(k), ",".join(str(r["seed"]) for r in done), f"FT {name}",
                         mean_std(pick("finetuned_accuracy")),
                         mean_std(pick("kernel_accuracy")), mean_std(pick("agreement")),
                         mean_std(pick("linearisation_error")), mean_std(pick("kernel_change"))))
            points += [{"task": task, "label": name, "kernel_accuracy": f["kernel_accuracy"],
                        "finetuned_accuracy": f["finetuned_accuracy"]}
                       for f in fts if f.get("kernel_accuracy") is not None]
    print(table(rows, ("task", "k", "seeds", "method", "test acc", "kernel acc", "agreement", "lin. error",
                       "kernel change")))
    for r in records:
        for _name, f in r.get("finetune", {}).items():
            print(f"{r['task']} k={r['k']} seed={r['seed']}: {f['verdict']}")
    write_json(results / "kernel_table.json", {"rows": rows, "records": records})
    if points:
        title = "SmolLM2-135M: LoRA rows vs the LoRA eNTK, full rows vs the projected eNTK"
        print(f"plot: {accuracy_scatter(points, results / 'kernel_table.png', title)}")


def main() -> None:
    ap = argparse.ArgumentParser(description="eNTK vs fine-tuning table on SmolLM2-135M")
    ap.add_argument("--tasks", default="sentiment")
    ap.add_argument("--k", default="16", help="comma-separated k per class")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ft", default="lora-sgd,lora-adamw,full-sgd,full-adamw")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr-lora-sgd", type=float, default=1e-2)
    ap.add_argument("--lr-lora-adamw", type=float, default=1e-3)
    ap.add_argument("--lr-full-sgd", type=float, default=1e-3)
    ap.add_argument("--lr-full-adamw", type=float, default=1e-5)
    ap.add_argument("--output", default="contrast", help="kernel output: contrast or logits")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--full-kernel", default="none", choices=["none", "projected"])
    ap.add_argument("--full-chunk-size", type=int, default=2,
                    help="examples per chunk of the projected full kernel (each holds full-model Jacobians)")
    ap.add_argument("--projection-dim", type=int, default=8192)
    ap.add_argument("--work", default="runs/kernel_table")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the rows, table and plot")
    ap.add_argument("--summary", action="store_true", help="only print/write the summary of saved rows")
    ap.add_argument("--include", type=Path, action="append", default=[],
                    help="another results folder whose rows join the summary (e.g. rows run on another device)")
    args = ap.parse_args()
    args.results = args.results.absolute()  # _common's write_json puts relative paths under RESULTS
    if not args.summary:
        # Seeds outermost: a run cut short still covers every task and k for the first seeds.
        for seed in (int(x) for x in args.seeds.split(",")):
            for task in args.tasks.split(","):
                for k in (int(x) for x in args.k.split(",")):
                    run_group(args, task, k, seed)
    summary(args.results, args.include)


if __name__ == "__main__":
    main()
