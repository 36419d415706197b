"""Sharded MeZO (FSDP2) on the CPU: 2 ranks against 1 process, per-rank parameter memory and step time.

    python benchmarks/mezo_fsdp.py --batch 16 --length 128 --steps 4

Runs, one after the other, the same MeZO steps (strided z, SmolLM2-135M shape, random weights,
fp32, batch `batch` x `length`, language-model loss) as

* ``single``: one process, the whole model, the whole batch (plain MeZO);
* ``fsdp``: ``torchrun --nproc_per_node 2`` with gloo, every parameter sharded over the two
  ranks (``ftlab.distributed.shard_model``), each rank evaluating half of the batch.

and reports, per rank: the bytes of parameters it holds, the peak RSS during the steps (reset
after sharding: every rank builds the whole model before sharding it), and the median step time
(over `steps` after one warm-up). The two processes share the 2 cores (1 thread each) while the
single process uses both, so step time compares the cost of gathering shards for every forward
at equal core count. Writes benchmarks/results/mezo_fsdp.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ftlab.memory import reset_peak, status_bytes

from _common import RESULTS, machine, median, table, timed, write_json


def model_135m() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from ftlab.distributed import init_from_env, local_part, shard, shard_model
    from ftlab.zo import MeZO

    rank, world = init_from_env("cpu")
    model = model_135m()
    if world > 1:
        shard_model(model, "cpu")
    ids = torch.randint(0, 49152, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    ids = torch.stack(shard(list(ids), rank, world))
    optimizer = MeZO(model.parameters(), lr=1e-6, eps=1e-3)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    held = sum(local_part(p)[0].numel() * p.element_size() for p in model.parameters())
    # The whole model was built on every rank before sharding: free it, then reset the peak.
    gc.collect()
    reset_peak()
    times = timed(lambda: optimizer.step(loss), args.steps)  # after one warm-up step
    row = {"rank": rank, "world": world, "param_bytes": held, "peak_rss": status_bytes("VmHWM"),
           "step_s": median(times), "steps_s": times,
           "grads": [s.grads for s in optimizer.history]}
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {}
    common = [__file__, "--worker", "--batch", str(args.batch), "--length", str(args.length),
              "--steps", str(args.steps)]
    launches = {"single": [sys.executable],
                "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}
    for name, launch in launches.items():
        out = RESULTS / f".mezo_fsdp_{name}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1" if name == "fsdp" else str(os.cpu_count())}
        subprocess.run([*launch, *common, "--out", str(out)], check=True, env=env)
        runs[name] = json.loads(out.read_text())
        out.unlink()
    single = runs["single"][0]
    print(table([(name, r["rank"], f"{r['param_bytes'] / 2**20:.1f}", f"{r['peak_rss'] / 2**20:.1f}",
                  f"{r['step_s']:.2f}") for name, rows in runs.items() for r in rows],
                ("run", "rank", "param MiB", "peak RSS MiB", "step s")))
    fsdp = runs["fsdp"]
    summary = {
        "param_fraction_per_rank": [r["param_bytes"] / single["param_bytes"] for r in fsdp],
        "step_time_ratio_fsdp_over_single": fsdp[0]["step_s"] / single["step_s"],
        "max_rel_grad_difference": max(abs(a - b) / max(abs(b), 1e-12) for sa, sb in
                                       zip(fsdp[0]["grads"], single["grads"]) for a, b in zip(sa, sb)),
    }
    print(json.dumps(summary, indent=2))
    write_json("mezo_fsdp.json", {"args": vars(args), "machine": machine(loadavg_end=os.getloadavg()),
                                  "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
