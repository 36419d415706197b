"""Zero-shot accuracy: ftlab against lm-evaluation-harness on the same examples, prompts and label words.

For each task the test examples ftlab evaluates (``make_splits`` with data seed 0) are exported to a
JSONL (prompt, options, label) with an lm-eval task YAML over it (``output_type: multiple_choice``,
``target_delimiter: ""``: the label words carry their own leading space). The embedded SmolLM2-135M is
given to both as the same Hugging Face folder (fp32, CPU). Compared per task: accuracy, per-example
agreement of the predicted option, the largest difference of an option's log-probability (ftlab's
score is the option tokens' mean log-probability, lm-eval's the sum: equal here, every label word is
one token), whether the two tokenise prompt + option alike, the margins of the examples they
disagree on, and the wall time of each (same examples, same batch size, same threads).

Run in the benchmark environment (lm-eval is not an ftlab dependency):

    benchmarks/.venv/bin/python -m pip install lm-eval       # once
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/lmeval_agreement.py --n 300

or one process per task side by side, then merged (a busy machine gives each process a share):

    for t in sentiment boolq corr2cause; do OMP_NUM_THREADS=1 benchmarks/.venv/bin/python \
        benchmarks/lmeval_agreement.py --tasks $t --n 100 --json lmeval_agreement_$t.json & done; wait
    benchmarks/.venv/bin/python benchmarks/lmeval_agreement.py \
        --merge lmeval_agreement_{sentiment,boolq,corr2cause}.json

Writes benchmarks/results/lmeval_agreement.json and the exported tasks under
benchmarks/results/lmeval_agreement/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, package_version, table, write_json  # noqa: E402

# Default tasks and their table names: binary sentiment, yes/no QA on a passage, 3-way NLI (the
# True/Neither/False prompt and label words). Any built-in classification task works (--tasks).
TASKS = {"sentiment": "sentiment (movie reviews)", "boolq": "boolq (yes/no QA)", "corr2cause": "corr2cause (3-way NLI)"}
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{options}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def export(task: str, n: int, folder: Path):
    """The test examples of ``task`` as JSONL + an lm-eval task YAML; returns (spec, examples)."""
    from ftlab.tasks import load_task, make_splits

    spec, examples = load_task(task)
    test = make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=n, data_seed=0).test
    data = folder / f"{task}.jsonl"
    with data.open("w") as f:
        for ex in test:
            f.write(json.dumps({"id": ex.id, "prompt": spec.prompt(ex), "options": list(spec.options),
                                "label": ex.label}) + "\n")
    (folder / f"ftlab_{task}.yaml").write_text(YAML.format(name=f"ftlab_{task}", data=data))
    return spec, test


def ftlab_side(model, tokenizer, spec, test, batch_size: int) -> dict:
    """ftlab's evaluate (timed), and its per-option scores (a second, untimed pass)."""
    import torch

    from ftlab import objectives
    from ftlab.evaluate import evaluate
    from ftlab.objectives import Encoder

    start = time.perf_counter()
    result = evaluate(model, tokenizer, spec, test, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    encoder, scores = Encoder(tokenizer, spec), []
    with torch.no_grad():
        for i in range(0, len(test), batch_size):
            part = test[i:i + batch_size]
            batch = encoder.classification(part, [spec.prompt(e) for e in part])
            scores += objectives.option_scores(model, batch, encoder.option_ids).tolist()
    return {"accuracy": result.metrics["accuracy"], "predictions": result.predictions, "scores": scores,
            "seconds": seconds}


def lmeval_side(lm, folder: Path, task: str, limit: int | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"ftlab_{task}"], task_manager=manager, log_samples=True,
                                  bootstrap_iters=0, random_seed=0, limit=limit)
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"][f"ftlab_{task}"], key=lambda s: s["doc_id"])
    logliks = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return {"accuracy": out["results"][f"ftlab_{task}"]["acc,none"], "logliks": logliks,
            "predictions": [max(range(len(ll)), key=ll.__getitem__) for ll in logliks],
            "ids": [s["doc"]["id"] for s in samples], "seconds": seconds}


def tokenisation_differs(tokenizer, spec, test) -> int:
    """Examples where tokenising prompt + option as one text (lm-eval) differs from prompt and
    option tokenised apart (ftlab), for some option."""
    differ = 0
    for ex in test:
        prompt = spec.prompt(ex)
        alone = tokenizer(prompt)["input_ids"]
        for option in spec.options:
            apart = alone + tokenizer(option, add_special_tokens=False)["input_ids"]
            if tokenizer(prompt + option)["input_ids"] != apart:
                differ += 1
                break
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="test examples per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", default="lmeval_agreement.json", help="results file (under benchmarks/results)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge result files of runs over separate tasks into --json, and print the table")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.json)

    from ftlab.models import load_model
    from ftlab.models.loading import converted_folder

    model, tokenizer = load_model(args.model)  # converts the embedded GGUF once into an HF folder
    model_dir = str(converted_folder(args.model))
    folder = RESULTS / "lmeval_agreement"
    folder.mkdir(parents=True, exist_ok=True)
    before = machine(lm_eval=package_version("lm_eval"), model_dir=model_dir)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=args.batch_size)
    rows, report = [], {}
    for i, task in enumerate(args.tasks):
        if i == 0:  # warm-up of both (first-call costs: thread pools, allocations), untimed
            spec, test = export(task, args.n, folder)
            ftlab_side(model, tokenizer, spec, test[:args.batch_size], args.batch_size)
            lmeval_side(lm, folder, task, limit=args.batch_size // 2)
        spec, test = export(task, args.n, folder)
        ours = ftlab_side(model, tokenizer, spec, test, args.batch_size)
        theirs = lmeval_side(lm, folder, task)
        assert theirs["ids"] == [e.id for e in test], "lm-eval's documents are not ftlab's examples in order"
        agree = [a == b for a, b in zip(ours["predictions"], theirs["predictions"])]
        diffs = [abs(a - b) for sa, sb in zip(ours["scores"], theirs["logliks"]) for a, b in zip(sa, sb)]
        margins = [top[-1] - top[-2] for ok, top in zip(agree, map(sorted, theirs["logliks"])) if not ok]
        report[task] = {
            "n": len(test), "options": list(spec.options), "template": spec.template,
            "ftlab_accuracy": ours["accuracy"], "lmeval_accuracy": theirs["accuracy"],
            "agreement": sum(agree) / len(agree), "disagreements": len(agree) - sum(agree),
            "disagreement_margins": margins, "max_abs_logprob_diff": max(diffs),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "tokenisation_differs": tokenisation_differs(tokenizer, spec, test),
            "ftlab_seconds": ours["seconds"], "lmeval_seconds": theirs["seconds"],
            "loadavg_after": os.getloadavg(),
        }
        rows.append(row(task, report[task]))
        print(table(rows[-1:], HEADER), flush=True)
        data = {"machine_before": before, "machine_after": machine(), "batch_size": args.batch_size, "n": args.n,
                "tasks": report}
        path = write_json(args.json, data)  # after every task: a long run keeps what it did
    print()
    print(table(rows, HEADER, markdown=True))
    print(f"\n{path}")


def row(task: str, r: dict) -> list:
    return [TASKS.get(task, task), r["n"], r["ftlab_accuracy"], r["lmeval_accuracy"], r["agreement"],
            r["max_abs_logprob_diff"], r["tokenisation_differs"], r["ftlab_seconds"], r["lmeval_seconds"],
            r["lmeval_seconds"] / r["ftlab_seconds"]]


def merge(paths: list[str], out: str) -> None:
    """One results file (and table) from runs that each did some of the tasks (run side by side)."""
    from _common import read_json

    parts = [read_json(p) for p in paths]
    data = {"runs": [{k: v for k, v in part.items() if k != "tasks"} for part in parts],
            "tasks": {t: r for part in parts for t, r in part["tasks"].items()}}
    path = write_json(out, data)
    print(table([row(t, r) for t, r in data["tasks"].items()], HEADER, markdown=True))
    print(f"\n{path}")


HEADER = ["task", "n", "ftlab acc", "lm-eval acc", "agreement", "max abs dlogp", "tokenised apart differs",
          "ftlab s", "lm-eval s", "lm-eval / ftlab time"]

if __name__ == "__main__":
    main()
