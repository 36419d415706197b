"""Feature extraction for probes: ftlab's batched path (one forward per batch, left-padded, the
head on the last position only, Phi p as one (B x V) @ (V x d) product) against a per-example
loop (one forward per prompt with the model's default full-sequence logits, as a straightforward
script would), side by side on the same prompts; the features must agree.

    python benchmarks/probe_features_speed.py --n 48 --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ftlab.models import load_model  # noqa: E402
from ftlab.objectives import Encoder, build_prompts  # noqa: E402
from ftlab.probe.features import FeatureSpec, extract  # noqa: E402
from ftlab.tasks import load_task, make_splits  # noqa: E402

from _common import machine, table, write_json  # noqa: E402


@torch.no_grad()
def per_example(model, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    weight = model.get_output_embeddings().weight
    fs, phis = [], []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model(input_ids=ids, output_hidden_states=True)
        fs.append(out.hidden_states[-1][0, -1])
        phis.append(torch.softmax(out.logits[0, -1].float(), -1) @ weight)
    return {"f": torch.stack(fs), "phi_p": torch.stack(phis)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="probe_features_speed.json")
    args = ap.parse_args()
    before = machine()
    model, tokenizer = load_model(args.model)
    spec, examples = load_task(args.task)
    prompts = build_prompts(spec, make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=args.n).test)
    encoder = Encoder(tokenizer, spec, max_length=128)
    fspec = FeatureSpec(("f", "phi_p"))
    times: dict[str, list[float]] = {"batched": [], "per-example loop": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        batched = extract(model, encoder, prompts, fspec, args.batch_size)
        times["batched"].append(time.perf_counter() - t)
        t = time.perf_counter()
        naive = per_example(model, tokenizer, prompts)
        times["per-example loop"].append(time.perf_counter() - t)
    diff = {k: float((batched[k] - naive[k]).abs().max() / naive[k].abs().max()) for k in fspec.kinds}
    best = {k: min(v) for k, v in times.items()}
    tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    rows = [[k, v, args.n / v, best["per-example loop"] / v] for k, v in best.items()]
    print(table(rows, ["method", "seconds (best of repeats)", "examples/s", "speed-up vs loop"]))
    print(f"max relative difference of the features (batched vs loop): {diff}")
    path = write_json(args.out, {"args": vars(args), "prompt_tokens": tokens, "seconds": times, "best": best,
                                 "speedup": best["per-example loop"] / best["batched"], "max_rel_diff": diff,
                                 "machine_before": before, "machine_after": machine()})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
