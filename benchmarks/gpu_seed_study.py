"""The basins study on one GPU, sized to finish in under 3 minutes on an H100 (an estimate: not yet
run on a GPU): more runs (19) and bigger evaluation sets than the CPU study
(benchmarks/seed_basins.py), self-contained (no network, no ftlab cache).

LoRA + AdamW fine-tuning runs of SmolLM2-135M on movie-review sentiment (``sentiment``), varying
data order and LoRA init (one at a time and together), each evaluated out of domain on tweets,
Amazon reviews and NYT editorials (``sentiment_tweets``, ``sentiment_amazon``, ``sentiment_nyt``: the
same prompt and label words, as in the packaged seeds-sentiment-ood); then the topography: pairwise
barriers on train and OOD examples (all alphas of a path in one forward), basins, sharpness and
Hessian trace, the loss surface, the prediction table and the verdict; and the pairwise paths of the
first runs timed against the straightforward loop, side by side.

The task examples come from a file under ``benchmarks/data/`` (:data:`STUDIES`), exported once with
``--export``; the model from ``--model`` (an embedded name where the ftlab cache holds it, else a
local Hugging Face folder of SmolLM2-135M). ``--study nli`` reruns the earlier study instead:
presuppositions_as_nli as entailment vs not, OOD on epistemic_reasoning and analytic_entailment,
from the BIG-bench examples frozen in ``seed_study_examples.json`` (exporting those again needs the
BIG-bench archive).

    PYTHONPATH=src python benchmarks/gpu_seed_study.py --model /path/to/smollm2-135m   # on the GPU, JSON/PNG under $OUT
    PYTHONPATH=src python benchmarks/gpu_seed_study.py --tiny --device cpu              # smoke test on a CPU
    PYTHONPATH=src python benchmarks/gpu_seed_study.py --export                         # rewrite the examples file
    PYTHONPATH=src python benchmarks/gpu_seed_study.py --study nli --model ...          # the earlier NLI study
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from _common import machine, table, write_json

DATA = Path(__file__).resolve().parent / "data"
# study -> its examples file, training task, OOD tasks, and the examples exported per task (None: all,
# in source order; else a seeded sample). sentiment-ood: the training task covers train.data.n_train
# (400) + --n-test (256), each OOD task --n-ood (256), with room to spare.
STUDIES = {
    "sentiment-ood": {"data": DATA / "seed_study_sentiment_examples.json", "train": "sentiment",
                      "ood": ["sentiment_tweets", "sentiment_amazon", "sentiment_nyt"],
                      "export": {"sentiment": 1000, "sentiment_tweets": 400, "sentiment_amazon": 400,
                                 "sentiment_nyt": 400}},
    "nli": {"data": DATA / "seed_study_examples.json", "train": "nli_binary",
            "ood": ["epistemic_reasoning", "analytic_entailment"],
            "export": {"nli_binary": None, "epistemic_reasoning": 400, "analytic_entailment": None}},
}


def export(study: dict) -> None:
    """Write the study's tasks' examples (their fields and label index) with each task's template and
    label words to ``study["data"]``, from the ftlab tasks (fetched on first use; the BIG-bench ones
    need the archive, ``ftlab data prepare --tarball``)."""
    from ftlab.tasks import builtin_task, load_task

    path, out = study["data"], {}
    for name in [study["train"], *study["ood"]]:
        spec, examples = load_task(name)
        n = study["export"][name]
        if n is not None:
            examples = random.Random(0).sample(examples, min(n, len(examples)))
        out[name] = {"template": spec.template, "options": spec.options,
                     "source": f"ftlab task {name!r} ({builtin_task(name).origin})"
                               + (f", {len(examples)} sampled" if n is not None else ""),
                     "examples": [{**ex.fields, "label": ex.label, "id": ex.id} for ex in examples]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=0) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB): "
          + ", ".join(f"{k} {len(v['examples'])}" for k, v in out.items()))


def write_tasks(data: dict, folder: Path) -> dict[str, str]:
    """The exported examples as JSONL task files (one per task)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, task in data.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "id"}) + "\n"
                                for e in task["examples"]))
        files[name] = str(path)
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=list(STUDIES), default="sentiment-ood")
    p.add_argument("--export", action="store_true", help="write the study's examples file from the ftlab tasks "
                                                         "and stop")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke setting (CPU)")
    p.add_argument("--runs", type=int, default=7, help="seed values per kind and in the all-at-once group "
                                                       "(runs = 3 (runs - 1) + 1: 19)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--n-ood", type=int, default=256, help="OOD test examples per task (sentiment-ood: 400 "
                                                          "exported each; nli: analytic_entailment has 70)")
    p.add_argument("--n-path", type=int, default=128, help="train and OOD examples each path point runs on")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    p.add_argument("--speed-runs", type=int, default=4, help="runs whose pairwise paths are timed against the loop")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu_seed_study"))
    args = p.parse_args()
    chosen = STUDIES[args.study]
    if args.export:
        export(chosen)
        return
    if args.tiny:
        args.runs, args.steps, args.batch_size, args.n_test, args.n_ood, args.n_path = 2, 2, 4, 8, 8, 6
        args.alphas, args.speed_runs = "0,0.5,1", 3
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls (fp32 weights)
        torch.backends.cudnn.allow_tf32 = True
    from ftlab.config import load_config
    from ftlab.runs import overwrite_dir
    from ftlab.seeds import SeedStudyConfig, run_study
    from ftlab.seeds.topography import TopographyConfig, topography

    out = Path(args.out).resolve()
    data = json.loads(chosen["data"].read_text())
    files = write_tasks(data, out / "data")
    train = data[chosen["train"]]
    study_dir = out / "study"
    overwrite_dir(study_dir, "seeds")  # a fresh study each time (only a folder ftlab wrote is removed)
    study = load_config(SeedStudyConfig, None, [
        f"output_dir={study_dir}", "kinds=[order, init]", f"runs_per_kind={args.runs}", f"runs_all={args.runs}",
        f"ood_tasks=[{', '.join(files[t] for t in chosen['ood'])}]", f"ood_n_test={args.n_ood}",
        f"train.model={args.model}", f"train.device={args.device}", f"train.data.task={files[chosen['train']]}",
        f"train.data.template={train['template']}", f"train.data.options={json.dumps(train['options'])}",
        "train.data.n_train=400", "train.data.n_dev=0", f"train.data.n_test={args.n_test}", "train.data.max_length=128",
        "train.mode=lora", "train.lora.r=8", "train.lora.alpha=16", "train.optimizer=adamw", f"train.lr={args.lr}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.eval_every=0",
        f"train.checkpoint_every={args.steps}", "train.eval_batch_size=64"])
    before = machine()
    timings = {}
    start = time.perf_counter()
    records = run_study(study, progress=False)
    timings["train_and_evaluate"] = time.perf_counter() - start
    alphas = [float(x) for x in args.alphas.split(",")]
    interior = len([a for a in alphas if a not in (0.0, 1.0)])
    cfg = TopographyConfig(alphas=alphas, n_train=args.n_path, n_ood=args.n_path, batch_size=32 if not args.tiny else 4,
                           group=interior, surface_points=9 if not args.tiny else 2,
                           hutchinson_samples=8 if not args.tiny else 1, n_curvature=64 if not args.tiny else 4,
                           n_boot=1000 if not args.tiny else 30, n_perm=5000 if not args.tiny else 100)
    start = time.perf_counter()
    report = topography(study_dir, cfg, out / "report")
    timings["topography"] = time.perf_counter() - start
    # The pairwise paths of the first runs: the straightforward loop against ftlab's grouped paths.
    import numpy as np
    from seed_paths_speed import loop, shared

    from ftlab.seeds.basins import barrier_matrix_from_means
    from ftlab.seeds.interpolation import saved_train_config
    from ftlab.train import load_run_data

    names = [r["name"] for r in records][:args.speed_runs]
    runs = {n: study_dir / "runs" / n for n in names}
    run_cfg = saved_train_config(runs[names[0]])
    examples = load_run_data(study.train).splits.train[:args.n_path]
    speed = {}
    for name, fn in (("loop", lambda: loop(names, runs, run_cfg, report_spec(study), examples, alphas, 32)),
                     ("grouped", lambda: shared(names, runs, run_cfg, report_spec(study), examples, alphas, 32,
                                                interior, False))):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        means = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        speed[name] = {"seconds": time.perf_counter() - t,
                       "barriers": barrier_matrix_from_means(means, np.asarray(alphas), False).tolist()}
    speed["max_barrier_difference"] = float(np.abs(np.asarray(speed["loop"]["barriers"])
                                                   - np.asarray(speed["grouped"]["barriers"])).max())
    timings["speed_check"] = speed["loop"]["seconds"] + speed["grouped"]["seconds"]
    rows = [(r["target"], r["predictor"], f"{r['estimate']:+.3f}", f"[{r['low']:+.3f}, {r['high']:+.3f}]",
             f"{r['p']:.3g}") for r in report["prediction"]]
    print(table(rows, ("target", "predictor", "estimate", "95% CI", "p")))
    print(report["verdict"])
    print(f"paths of {len(names)} runs: loop {speed['loop']['seconds']:.1f} s, "
          f"grouped {speed['grouped']['seconds']:.1f} s "
          f"({speed['loop']['seconds'] / speed['grouped']['seconds']:.1f}x), max barrier difference "
          f"{speed['max_barrier_difference']:.1e}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    summary = {"args": vars(args), "runs": len(records), "seconds": timings, "speed": speed,
               "verdict": report["verdict"], "scale": report["scale"], "clustering": report["clustering"],
               "members": report["members"], "prediction": report["prediction"], "accuracy": report["accuracy"],
               "barrier_summary": report["barrier_summary"], "features": report["features"],
               "machine_before": before, "machine_after": machine()}
    path = write_json(out / "gpu_seed_study.json", summary)
    print(f"wrote {path} and {out / 'report'}/*.png")


def report_spec(study):
    from ftlab.train import load_run_data

    return load_run_data(study.train).spec


if __name__ == "__main__":
    main()
