"""Speed of ftlab's batched option scoring against a straightforward reference, side by side.

    python benchmarks/scoring_speed.py --n 128 --repeats 3

Reference ("naive"): one forward per (example, option) sequence, full-vocabulary logits at every
position, log-softmax over them, mean log-prob of the option tokens -- the pattern of research
code that scores options one sequence at a time. ftlab: left-padded batches, logits only at the
last position(s) (`logits_to_keep`), one row per example when all options are single tokens.
Both score the same examples with the same model; the script checks they agree, prints a table
and writes benchmarks/results/scoring_speed.json.
"""

from __future__ import annotations

import argparse

import torch

from ftlab.evaluate import evaluate
from ftlab.models import load_model
from ftlab.tasks import load_task, make_splits

from _common import clock, machine, table, write_json


@torch.no_grad()
def naive_predictions(model, tokenizer, spec, examples) -> list[int]:
    preds = []
    for ex in examples:
        prompt = tokenizer(spec.prompt(ex))["input_ids"]
        scores = []
        for option in spec.options:
            opt = tokenizer(option, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt + opt])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(opt)) / len(opt))
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    spec, examples = load_task(args.task)
    test = make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=args.n).test
    times = {"naive": [], "ftlab": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        with clock() as c:
            naive = naive_predictions(model, tokenizer, spec, test)
        times["naive"].append(c.seconds)
        with clock() as c:
            ours = evaluate(model, tokenizer, spec, test, batch_size=args.batch_size, progress=False).predictions
        times["ftlab"].append(c.seconds)
    agree = sum(a == b for a, b in zip(naive, ours)) / len(test)
    best = {k: min(v) for k, v in times.items()}
    row = {"model": args.model, "task": args.task, "n": len(test), "batch_size": args.batch_size,
           "naive_s": round(best["naive"], 2), "ftlab_s": round(best["ftlab"], 2),
           "speedup": round(best["naive"] / best["ftlab"], 2), "prediction_agreement": agree,
           "threads": torch.get_num_threads()}
    print(table([[str(v) for v in row.values()]], row, markdown=True))
    write_json("scoring_speed.json", {**row, "all_times_s": times, "machine": machine()})


if __name__ == "__main__":
    main()
