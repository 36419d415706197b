"""What each of TinT's approximations costs on SmolLM2-135M, switched on one at a time, on real
4-shot sentiment contexts (label-word loss and whole-context loss), for k = 1 and 4 top layers.

    nice -n 10 .venv/bin/python benchmarks/tint_approx.py [n_contexts]

Per setting: relative error and cosine of the weight update against exact dynamic evaluation,
and the test-part (query) next-token loss after the step; finite differences also at N = 1, 1e4."""

from __future__ import annotations

import sys

import numpy as np
import torch

from _common import machine, table, write_json


def main() -> None:
    torch.set_num_threads(1)  # the 2-core machine is shared: one thread per process spins least
    from ftlab.models import load_model
    from ftlab.tasks import load_task, make_splits
    from ftlab.tint.experiment import draw_demos, encode_context, single_token_options
    from ftlab.tint.inner import inner_from_hf
    from ftlab.tint.reference import approximation_costs, whole_context_mask

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    before = machine()
    model, tok = load_model("smollm2-135m")
    inner = inner_from_hf(model, torch.float32)
    spec, examples = load_task("sentiment")
    splits = make_splits(examples, seed=0, n_train=200, n_dev=0, n_test=n)
    opts = single_token_options(tok, spec)
    lr = 1e-3
    rows, raw = [], {}
    for k in (1, 4):
        for loss in ("label", "context"):
            for fd in ((1.0, 100.0, 1e4) if (k, loss) == (1, "label") else (100.0,)):
                acc: dict[str, list[dict]] = {}
                for q in splits.test:
                    ctx = encode_context(tok, spec, draw_demos(splits.train, q, 4, 0), q, 512, opts)
                    mask = ctx.label_mask if loss == "label" else whole_context_mask(ctx.ids, ctx.n_train)
                    for name, r in approximation_costs(inner, ctx.ids, ctx.n_train, mask, k, lr, fd).items():
                        acc.setdefault(name, []).append(r)
                key = f"k={k} {loss} N={fd:g}"
                raw[key] = acc
                for name, rs in acc.items():
                    if fd != 100.0 and name not in ("finite_diff", "all (TinT)"):
                        continue
                    mean = lambda f, rs=rs: float(np.mean([r.get(f, np.nan) for r in rs]))  # noqa: E731
                    rows.append((key, name, mean("update_rel_error"), mean("update_cosine"), mean("test_loss")))
    print(table(rows, ("setting", "approximation", "update rel. error", "update cosine", "test-part loss")))
    write_json("tint_approx.json", {"machine_before": before, "machine_after": machine(), "lr": lr,
                                    "n_contexts": n, "results": raw})


if __name__ == "__main__":
    main()
