"""Zero-shot and in-context (k demonstrations) quality of an embedded model on the built-in tasks.

    python benchmarks/eval_baselines.py --model smollm2-135m --tasks sentiment boolq trec siqa \
        --n-test 1000 --k 0 4
    python benchmarks/eval_baselines.py --tasks disflqa --n-test 255 --k 0   # extractive QA: F1/EM

Prints a table and writes benchmarks/results/eval_baselines_<model>_<tasks>.json. The test split is the
MeZO-protocol one (data_seed 0), identical to `ftlab eval --n-test N`; demonstrations come from
the seed-0 train split of 1000 examples (tasks with fewer examples are scaled down by
``make_splits``). A task's source is fetched on first use.
"""

from __future__ import annotations

import argparse
import json

from ftlab.evaluate import evaluate
from ftlab.models import load_model
from ftlab.tasks import load_task, make_splits

from _common import clock, machine, table, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "boolq", "trec", "siqa"])
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    rows = []
    for task in args.tasks:
        spec, examples = load_task(task)
        splits = make_splits(examples, seed=0, n_train=1000, n_dev=0, n_test=args.n_test)
        for k in args.k:
            with clock() as c:
                result = evaluate(model, tokenizer, spec, splits.test, demos=splits.train, k_shot=k, seed=0,
                                  batch_size=args.batch_size, desc=f"{task} k={k}")
            rows.append({"task": task, "k_shot": k, **result.metrics, "seconds": round(c.seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)

    keys = ["task", "k_shot", "accuracy", "f1", "em", "n", "seconds"]
    keys = [k for k in keys if any(k in r for r in rows)]
    cells = [[f"{r[k]:.4f}" if isinstance(r.get(k), float) and k != "seconds" else str(r.get(k, "")) for k in keys]
             for r in rows]
    print("\n" + table(cells, keys, markdown=True))
    out = write_json(f"eval_baselines_{args.model}_{'-'.join(args.tasks)}.json",
                     {"model": args.model, "n_test": args.n_test, "rows": rows, "machine": machine()})
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
