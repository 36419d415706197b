"""Offloaded MeZO on a CUDA device: exactness against plain exact-mode MeZO, then speed and GPU memory.

    PYTHONPATH=src python benchmarks/offload_gpu.py [--big-layers 24 --big-hidden 2048]

1. Exactness: a small random Llama (fp32 and bf16, tied embeddings, weight decay) trained 5 steps
   by MeZO(exact=True) with the model on the GPU and by OffloadedMeZO(device="cuda") with blocks
   in pinned CPU memory (prefetch on and off): projected gradients, L+ and weights (after flush)
   are compared bitwise; between steps the blocks must be in pinned CPU memory.
2. Speed/memory: a ~1.1B random Llama in bf16 (batch x length random tokens, causal LM loss):
   seconds per step (median after two warm-ups) and the steady-state peak GPU memory of plain
   MeZO vs offloaded (prefetch on/off), and the pinned host<->device bandwidth of the blocks.
Prints one JSON line per result (and writes them to $OUT/offload_gpu.jsonl when OUT is set).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ftlab.zo.mezo import MeZO
from ftlab.zo.offload import OffloadedMeZO

from _common import machine, median, timed

LINES = []


def emit(**record):
    LINES.append(json.dumps(record))
    print(LINES[-1], flush=True)


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def closures(model, ids):
    single = lambda: lm_loss(model(input_ids=ids, use_cache=False).logits, ids)  # noqa: E731
    two = torch.cat([ids, ids])
    b = ids.shape[0]

    def pair():
        logits = model(input_ids=two, use_cache=False).logits
        return torch.stack([lm_loss(logits[:b], ids), lm_loss(logits[b:], ids)])
    return torch.no_grad()(single), torch.no_grad()(pair)


def build(layers, hidden, vocab, dtype, device):
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                         vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def exactness():
    kw = dict(lr=1e-3, eps=1e-3, seed=7, weight_decay=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        for prefetch in (True, False):
            plain = build(4, 256, 1000, dtype, "cuda")
            off = copy.deepcopy(plain).cpu()
            ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
            ref = MeZO(plain.parameters(), exact=True, **kw)
            ref.attach(plain)
            opt = OffloadedMeZO(off.parameters(), model=off, device="cuda", prefetch=prefetch, **kw)
            single, _ = closures(plain, ids)
            _, pair = closures(off, ids)
            same_loss, pinned = True, True
            for _ in range(5):
                same_loss &= float(ref.step(single)) == float(opt.step(pair))
                pinned &= all(p.device.type == "cpu" and p.is_pinned() for p in off.model.layers.parameters())
            resident = all(p.is_cuda for n, p in off.named_parameters() if ".layers." not in n)
            opt.flush()
            same_w = all(torch.equal(p, q.cuda()) for p, q in zip(plain.parameters(), off.parameters()))
            emit(check="exactness", dtype=str(dtype), prefetch=prefetch, same_grads=[r.grads for r in ref.history]
                 == [r.grads for r in opt.history], same_loss=same_loss, same_weights=same_w,
                 blocks_pinned_cpu=pinned, rest_on_gpu=resident, moves=dict(opt.moves))


def steady(step, repeats):
    """Median seconds of ``repeats`` steps after two warm-ups; the peak memory counts from there."""
    timed(step, 0, warmup=2, sync=torch.cuda.synchronize)
    torch.cuda.reset_peak_memory_stats()  # the peak of the steady state (after two warm-ups)
    return median(timed(step, repeats, warmup=0, sync=torch.cuda.synchronize))


def speed(layers, hidden, batch, length, repeats):
    vocab = 32000
    kw = dict(lr=1e-6, eps=1e-3, seed=7)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).cuda()
    model = build(layers, hidden, vocab, torch.bfloat16, "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    cpu_copy = copy.deepcopy(model).cpu()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    opt = MeZO(model.parameters(), exact=True, **kw)
    opt.attach(model)
    single, _ = closures(model, ids)
    t = steady(lambda opt=opt, single=single: opt.step(single), repeats)
    emit(check="speed", mode="mezo_exact_on_gpu", params=n_params, batch=batch, length=length, s_per_step=t,
         peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    del model, opt, single
    gc.collect()  # MeZO's hooks and OffloadedMeZO's wrapped classes tie model and optimizer in a cycle
    masters = [p.detach().pin_memory() for p in cpu_copy.model.layers.parameters()]
    nbytes = sum(m.numel() * m.element_size() for m in masters)
    devs = [torch.empty_like(m, device="cuda") for m in masters]
    h2d = steady(lambda devs=devs, masters=masters: [d.copy_(m, non_blocking=True) for d, m in zip(devs, masters)], 3)
    d2h = steady(lambda devs=devs, masters=masters: [m.copy_(d, non_blocking=True) for d, m in zip(devs, masters)], 3)
    emit(check="bandwidth", blocks_gib=nbytes / 2**30, h2d_gb_s=nbytes / h2d / 1e9, d2h_gb_s=nbytes / d2h / 1e9)
    del masters, devs
    for prefetch in (True, False):
        off = copy.deepcopy(cpu_copy)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        opt = OffloadedMeZO(off.parameters(), model=off, device="cuda", prefetch=prefetch, **kw)
        _, pair = closures(off, ids)
        t = steady(lambda opt=opt, pair=pair: opt.step(pair), repeats)
        opt.flush()
        emit(check="speed", mode=f"offloaded_prefetch_{prefetch}", params=n_params, batch=batch, length=length,
             s_per_step=t, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        del off, opt, pair
        gc.collect()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-layers", type=int, default=24)
    ap.add_argument("--big-hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    emit(device=torch.cuda.get_device_name(), **machine())
    exactness()
    if not args.skip_speed:
        speed(args.big_layers, args.big_hidden, args.batch, args.length, args.repeats)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "offload_gpu.jsonl"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
