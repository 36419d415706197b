"""First-order training throughput on one GPU: fp32 against bf16 autocast, with and without
activation checkpointing, full and LoRA, through ftlab's own step (``make_closure`` with
``bf16_autocast``, ``enable_gradient_checkpointing``, ``prepare_model``).

    PYTHONPATH=src python benchmarks/gpu_ddp.py                       # on the GPU machine, < 2 min
    PYTHONPATH=src python benchmarks/gpu_ddp.py --device cpu --tiny   # a quick check on a CPU

The model has SmolLM2-135M's shape (Llama, 30 layers, width 576, vocabulary 49,152, tied head)
and random weights built from its config (no download); the batch is random tokens
(``--batch`` x ``--length``), the loss the language-model loss, the optimizer SGD (momentum 0.9).
Each configuration: ``--warmup`` untimed steps, then ``--steps`` timed ones (CUDA-synchronised);
reported: median step time, examples/s and tokens/s, peak memory, and the speed-up of bf16
autocast over fp32. Writes ``$OUT/gpu_ddp.json`` (or benchmarks/results/gpu_ddp.json without $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def build(tiny: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # SmolLM2-135M
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def measure(mode: str, autocast: bool, checkpointing: bool, args: argparse.Namespace) -> dict:
    from ftlab.config import TrainConfig
    from ftlab.models import prepare_model
    from ftlab.optim import build_optimizer
    from ftlab.parallel import bf16_autocast
    from ftlab.train import enable_gradient_checkpointing, make_closure

    device = torch.device(args.device)
    model = build(args.tiny).to(device)
    module = prepare_model(model, mode, seed=0)
    if checkpointing:
        enable_gradient_checkpointing(module)
    module.train()
    optimizer = build_optimizer(TrainConfig(optimizer="sgd", lr=1e-3, momentum=0.9), module)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(1)).to(device)
    closure = make_closure(optimizer, lambda: module(input_ids=ids, labels=ids, use_cache=False).loss, 1.0,
                           autocast=bf16_autocast(args.device) if autocast else None)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        optimizer.step(closure)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(float(optimizer.step(closure)))
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    row = {"mode": mode, "precision": "bf16 autocast" if autocast else "fp32", "checkpointing": checkpointing,
           "median_step_s": median, "examples_per_s": args.batch / median,
           "tokens_per_s": args.batch * args.length / median, "last_loss": losses[-1],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
    return row  # the model is freed with this frame (the caller empties the CUDA cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check of the script)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="full,lora")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.length, args.steps, args.warmup = min(args.batch, 4), min(args.length, 32), 2, 1
    started = time.perf_counter()
    info = {"torch": torch.__version__, "device": args.device, "batch": args.batch, "length": args.length,
            "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the default; stated)
    rows, errors = [], []
    for mode in args.modes.split(","):
        for autocast, checkpointing in ((False, False), (True, False), (True, True)):
            try:
                rows.append(measure(mode, autocast, checkpointing, args))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                r = rows[-1]
                print(f"{mode:5s} {r['precision']:13s} ckpt={checkpointing!s:5s} "
                      f"{r['median_step_s'] * 1e3:8.1f} ms/step "
                      f"{r['examples_per_s']:8.1f} ex/s  peak {r['peak_mem_gib'] or 0:.2f} GiB", flush=True)
            except Exception as e:  # keep the other rows; the error is recorded
                errors.append({"mode": mode, "autocast": autocast, "checkpointing": checkpointing,
                               "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
                print(f"{mode} autocast={autocast} checkpointing={checkpointing}: {type(e).__name__}: {e}", flush=True)
    for r in rows:
        fp32 = next((x for x in rows if x["mode"] == r["mode"] and x["precision"] == "fp32"), None)
        r["speedup_vs_fp32"] = fp32["median_step_s"] / r["median_step_s"] if fp32 else None
    result = {"info": info, "rows": rows, "errors": errors, "wall_s": time.perf_counter() - started}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("gpu_ddp_tiny.json" if args.tiny else "gpu_ddp.json")).write_text(json.dumps(result, indent=2))
    print(json.dumps({"wall_s": result["wall_s"], "errors": len(errors)}))


if __name__ == "__main__":
    main()
