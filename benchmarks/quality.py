"""MeZO-paper Table 1 on the embedded model: zero-shot, in-context, linear probing, MeZO (full/LoRA/prefix)
and first-order fine-tuning (full/LoRA), per task, with steps, wall time and peak memory per row.

    python benchmarks/quality.py --tasks sentiment --mezo-steps 200 --ft-steps 100
    python benchmarks/quality.py --device cuda --jobs 8 --mezo-steps 4000 --ft-steps 400 --results DIR

Default tasks: sentiment (movie-review snippets), boolq (yes/no on a passage), trec (6-way question
type), siqa (3-way multiple choice by letter) and disflqa (extractive QA, F1).

Every row runs in a fresh process (so its peak RSS, or peak CUDA memory, is its own) and is
saved to ``<results>/quality/<task>_<method>.json`` as soon as it finishes; a rerun
skips rows already there, and a killed training row resumes from its run folder
(``runs/quality/...``). Prints a markdown table, writes ``benchmarks/results/quality.json`` and
a bar chart ``<results>/quality.png`` (``<results>`` is ``benchmarks/results`` unless ``--results``
says otherwise). ``--jobs N`` runs N rows at once (on a GPU, where one small model leaves it idle).
Every row of a task uses the same splits (data seed 0): ``--n-train`` training examples,
``--n-dev`` dev examples for checkpoint selection, ``--n-test`` test, prompts cut from the left to
``--max-length`` tokens; each defaults to the task's entry in :data:`TASK_SETTINGS`, else to
1000 / 100 / 500 / 128 (a flag given sets it for every task).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# method -> (mode, optimizer, settings). MeZO: the paper's lr/eps per mode, except LoRA, whose lr
# is raised 10x for runs this short; first order: AdamW as in src/ftlab/configs/sentiment-{full,lora}.yaml.
METHODS = {
    "mezo-full": ("full", "mezo", ["lr=1e-6", "zo.eps=1e-3"]),
    "mezo-lora": ("lora", "mezo", ["lr=1e-3", "zo.eps=1e-2", "lora.r=8", "lora.alpha=16"]),
    "mezo-prefix": ("prefix", "mezo", ["lr=1e-2", "zo.eps=1e-1", "prefix.num_tokens=5"]),
    "ft-full": ("full", "adamw", ["lr=1e-5"]),
    "ft-lora": ("lora", "adamw", ["lr=5e-4", "lora.r=8", "lora.alpha=16"]),
}
BASELINES = {"zero-shot": 0, "in-context": 4}
# Linear probing (LP, MeZO Table 1): logistic regression on the frozen last hidden state f(s) at the
# prompt's end (ftlab.probe), C chosen on the dev split; classification tasks only.
PROBES = {"linear-probe": "f"}
DEFAULT_TASKS = ["sentiment", "boolq", "trec", "siqa", "disflqa"]
DEFAULTS = {"n_train": 1000, "n_dev": 100, "n_test": 500, "max_length": 128}
# Where the defaults do not fit a task (prompt lengths in SmolLM2 tokens). sentiment, trec and siqa
# prompts fit 128 (99th percentile 58, 35, 79). boolq passages: median 138, 95th percentile 285;
# 384 cuts 1.2% of the prompts (from the left, the question stays). disflqa: 755 examples, all used;
# contexts median 184, 95th percentile 348; 512 (480 for the prompt beside 32 answer tokens) cuts 1.3%.
TASK_SETTINGS = {
    "boolq": {"max_length": 384},
    "disflqa": {"n_train": 400, "n_dev": 100, "n_test": 255, "max_length": 512},
}


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    from ftlab.memory import lifetime_peak_bytes

    return lifetime_peak_bytes() / 2**20


def task_settings(task: str, args: argparse.Namespace) -> dict[str, int]:
    """n_train, n_dev, n_test and max_length of ``task``: the flag where given, else the task's
    :data:`TASK_SETTINGS` entry, else :data:`DEFAULTS`."""
    own = TASK_SETTINGS.get(task, {})
    return {key: getattr(args, key) if getattr(args, key) is not None else own.get(key, default)
            for key, default in DEFAULTS.items()}


def run_row(task: str, method: str, args: argparse.Namespace) -> dict:
    """One row, in this process: a baseline evaluation or a training run."""
    from ftlab.config import TrainConfig, load_config
    from ftlab.evaluate import evaluate
    from ftlab.models import load_model
    from ftlab.train import load_run_data, train

    data_settings = task_settings(task, args)
    common = [f"model={args.model}", f"device={args.device}", f"data.task={task}",
              *(f"data.{key}={value}" for key, value in data_settings.items()),
              f"batch_size={args.batch_size}", f"seed={args.seed}", "eval_batch_size=32"]
    start = time.perf_counter()
    if method in PROBES:
        from ftlab.probe.cache import split_features
        from ftlab.probe.features import FeatureSpec
        from ftlab.probe.probes import fit_probe

        cfg = load_config(TrainConfig, None, common)
        model, tokenizer = load_model(cfg.model, device=cfg.device)
        data, kind = load_run_data(cfg), PROBES[method]
        feats = {name: split_features(model, tokenizer, data.spec, examples, name, FeatureSpec((kind,)),
                                      max_length=cfg.data.max_length)[kind]
                 for name, examples in (("train", data.splits.train), ("dev", data.splits.dev),
                                        ("test", data.splits.test))}
        labels = {name: [e.label for e in getattr(data.splits, name)] for name in feats}
        r = fit_probe(feats["train"], labels["train"], feats["test"], labels["test"], feats["dev"], labels["dev"],
                      seed=args.seed)
        metrics, steps = {"accuracy": r.accuracy, "n": r.n_test, "ci_low": r.ci_low, "ci_high": r.ci_high,
                          "C": r.C}, 0
    elif method in BASELINES:
        cfg = load_config(TrainConfig, None, common)
        model, tokenizer = load_model(cfg.model, device=cfg.device)
        data = load_run_data(cfg)
        k = BASELINES[method]  # demonstrations need room: in-context prompts may be 4x longer
        result = evaluate(model, tokenizer, data.spec, data.splits.test, demos=data.splits.train,
                          k_shot=k, seed=args.seed, max_length=cfg.data.max_length * (1 + k),
                          batch_size=16, desc=f"{task} {method}")
        metrics, steps = result.metrics, 0
    else:
        mode, optimizer, settings = METHODS[method]
        steps = args.mezo_steps if optimizer == "mezo" else args.ft_steps
        cfg = load_config(TrainConfig, None, common + settings + args.set + [
            f"mode={mode}", f"optimizer={optimizer}", f"steps={steps}", f"eval_every={max(1, steps // 4)}",
            # The table's protocol: the test score of the best of 4 dev evaluations (none without dev).
            f"keep={'best' if data_settings['n_dev'] else 'last'}",
            f"checkpoint_every={max(1, steps // 4)}", f"output_dir={args.runs}/{task}-{method}"])
        metrics = train(cfg, progress=True)["test"]
    return {"task": task, "method": method, "steps": steps, **metrics, "data": data_settings,
            "seconds": round(time.perf_counter() - start, 1), "peak_mib": round(_peak_mib(args.device))}


def _table(rows: list[dict]) -> str:
    lines = ["| task | method | accuracy / F1 | steps | wall time (s) | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        score = r.get("accuracy", r.get("f1"))
        lines.append(f"| {r['task']} | {r['method']} | {score:.3f} | {r['steps']} | {r['seconds']:.0f} "
                     f"| {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tasks) * len(methods) / 4, 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, task in enumerate(tasks):
            for r in rows:
                if r["task"] == task and r["method"] == method:
                    xs.append(i + j * width)
                    ys.append(r.get("accuracy", r.get("f1")))
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set(ylabel="test accuracy / F1", title="Fine-tuning methods on the embedded model", ylim=(0, 1))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_generation(task: str) -> bool:
    """A generation task (no probe row): a built-in task's kind, else guessed from the name."""
    from ftlab.errors import FtlabError
    from ftlab.tasks import get_spec

    try:
        return get_spec(task).kind == "generation"
    except FtlabError:
        return False


def _row_in_child(task: str, method: str, folder: Path) -> dict:
    """Run one row in a fresh process (its own peak memory), unless its result is already saved."""
    path = folder / f"{task}_{method}.json"
    if not path.exists():
        cmd = [sys.executable, __file__, *sys.argv[1:], "--row", f"{task}:{method}"]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        path.write_text(out.strip().splitlines()[-1] + "\n")
    row = json.loads(path.read_text())
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                        help="built-in tasks (ftlab data list) or task files; default: %(default)s")
    parser.add_argument("--methods", nargs="+", default=[*BASELINES, *PROBES, *METHODS])
    parser.add_argument("--mezo-steps", type=int, default=200)
    parser.add_argument("--ft-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    for key, default in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"for every task (default: the task's TASK_SETTINGS, else {default})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for the training rows, e.g. zo.chunk_size=262144")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the JSON rows, table and plot")
    parser.add_argument("--runs", default="runs/quality", help="folder for the training runs (resumable)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: TASK:METHOD, run in this process
    args = parser.parse_args()

    if args.row:
        task, method = args.row.split(":")
        print(json.dumps(run_row(task, method, args)))
        return
    results = Path(args.results)
    (results / "quality").mkdir(parents=True, exist_ok=True)
    todo = [(task, method) for task in args.tasks for method in args.methods
            if not (method in PROBES and _is_generation(task))]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda row: _row_in_child(*row, results / "quality"), todo))
    print("\n" + _table(rows))
    (results / "quality.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    _plot(rows, results / "quality.png")
    print(f"\nwritten to {results / 'quality.json'} and {results / 'quality.png'}")


if __name__ == "__main__":
    main()
