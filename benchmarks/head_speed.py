"""What :func:`ftlab.models.head.output_head` saves in a training step and in option scoring.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/head_speed.py --batch-sizes 1,8,16 --repeats 5

Transformers computes ``lm_head(hidden[:, -k:])``; the slice is not contiguous for batches of
more than one row, and PyTorch then multiplies it against a broadcast copy of the whole
vocabulary matrix per row. ``ftlab.objectives`` runs the head inside ``output_head`` (one plain
matmul). This script times, on SmolLM2-135M with LoRA and the sentiment prompts, the training
loss's forward + backward and the option scores' forward, each with the model's own head
("transformers head") and inside ``output_head`` ("ftlab head"), alternating call by call on the
same batch, and checks both give the same numbers. Prints a table, writes
``benchmarks/results/head_speed.json``.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext
from unittest.mock import patch

import torch

from ftlab.models import LoraSettings, load_model, prepare_model
from ftlab.objectives import Encoder, loss, option_scores
from ftlab.tasks import load_task, make_splits

from _common import clock, machine, median, table, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = prepare_model(model, "lora", lora=LoraSettings(r=8, alpha=16))
    spec, examples = load_task("sentiment")
    encoder = Encoder(tokenizer, spec)
    rows = []
    for bs in map(int, args.batch_sizes.split(",")):
        exs = make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=bs).test
        batch = encoder.classification(exs, [spec.prompt(ex) for ex in exs])
        trainable = [p for p in module.parameters() if p.requires_grad]

        def step(batch=batch, trainable=trainable):  # the training loss's forward and backward
            value = loss(module, batch, encoder.option_ids)
            return torch.cat([g.flatten() for g in torch.autograd.grad(value, trainable)])

        def scores(batch=batch):
            with torch.no_grad():
                return option_scores(module, batch, encoder.option_ids)

        for name, fn in (("loss forward + backward", step), ("option scores (forward)", scores)):
            seconds = {"transformers head": [], "ftlab head": []}
            outs = {}
            for _ in range(args.repeats):
                for head in seconds:
                    own = head == "transformers head"
                    ctx = patch("ftlab.objectives.output_head", _model_head) if own else nullcontext()
                    with ctx, clock() as c:
                        outs[head] = fn()
                    seconds[head].append(c.seconds)
            diff = float((outs["ftlab head"] - outs["transformers head"]).abs().max())
            own, fast = median(seconds["transformers head"]), median(seconds["ftlab head"])
            rows.append({"what": name, "batch_size": bs, "tokens": int(batch.attention_mask.sum()),
                         "transformers_head_s": own, "ftlab_head_s": fast, "speedup": own / fast,
                         "max_abs_diff": diff, "seconds": seconds})
    write_json("head_speed.json", {"model": "smollm2-135m", "task": "sentiment", "mode": "lora r=8",
                                   "threads": args.threads, "repeats": args.repeats, "rows": rows,
                                   "machine": machine()})
    print(table([(r["what"], r["batch_size"], f"{r['transformers_head_s'] * 1e3:.0f}", f"{r['ftlab_head_s'] * 1e3:.0f}",
                  f"{r['speedup']:.2f}x", f"{r['max_abs_diff']:.1e}") for r in rows],
                ("what", "batch", "transformers head ms (median)", "ftlab head ms", "speedup", "max |diff|")))


@contextmanager
def _model_head(module, rows=None):
    """Stands in for ``output_head`` in ``ftlab.objectives``: leaves the model's own head."""
    yield False


if __name__ == "__main__":
    main()
