"""Per-example LESS feature time for LoRA on SmolLM2: the batched LoRA gradients the pipeline
uses (hooks: one forward + one backward per batch) against batched ``vmap(grad)`` and a naive
per-example loop, and the projection's share of the total at d = 8192.

    python benchmarks/less_features_speed.py                      # 8 examples of 128 tokens
    python benchmarks/less_features_speed.py --device cuda --n 32 --length 256

Examples are random token sequences of ``--length`` tokens whose last ``--response`` tokens are
the response (the loss is on those only). Each stage is timed on the same examples:
gradients (forward + backward; batched by hooks or with vmap, or one example at a time with autograd),
Adam preconditioning, and the projection (sparse JL sketch, the default, and the dense blocked
Rademacher map with ``--dense``, for comparison). Writes ``benchmarks/results/less_features_speed.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import RESULTS, clock, machine, table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8, help="examples (one vmap batch)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--response", type=int, default=16)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dense", action="store_true",
                   help="also time the dense Rademacher projection (regenerated on every call: minutes on CPU)")
    p.add_argument("--output", default=str(RESULTS / "less_features_speed.json"))
    args = p.parse_args()

    from ftlab.grads.projection import ProjectionSpec, Projector
    from ftlab.models import LoraSettings, load_model, trainable_parameters
    from ftlab.select.data import collate
    from ftlab.select.features import AdamState, feature_blocks, normalise, per_example_grads, vmap_per_example_grads
    from ftlab.select.pipeline import SelectConfig, load_lora_model
    from ftlab.select.warmup import response_loss

    base, tok = load_model(args.model, device=args.device, attn_implementation="eager")
    cfg = SelectConfig(model=args.model, device=args.device, lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    module, tok = load_lora_model(cfg, base, tok)
    params = trainable_parameters(module)
    dim_in = sum(p.numel() for _, p in params)
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randint(100, 40000, (args.length,), generator=gen).tolist(), args.response) for _ in range(args.n)]
    batch = collate(rows, tok.pad_token_id).to(args.device)
    adam = AdamState({n: (torch.randn(p.shape, generator=gen).to(args.device) * 1e-3,
                          torch.rand(p.shape, generator=gen).to(args.device) * 1e-6) for n, p in params})

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    per_example_grads(module, collate(rows[:1], tok.pad_token_id).to(args.device))  # warm-up (allocator, kernels)
    with clock(sync) as batched:
        grads = per_example_grads(module, batch)
    vmap_per_example_grads(module, collate(rows[:1], tok.pad_token_id).to(args.device))
    with clock(sync) as vmap:
        vmapped = vmap_per_example_grads(module, batch)
    # relative to the largest entry overall: fresh LoRA has B = 0, so every A gradient is exactly 0
    max_diff = (max(float((grads[n] - vmapped[n]).abs().max()) for n in grads)
                / max(float(vmapped[n].abs().max()) for n in grads))

    with clock(sync) as loop:
        for row in rows:
            module.zero_grad(set_to_none=True)
            response_loss(module, collate([row], tok.pad_token_id).to(args.device)).backward()
    with clock(sync) as precondition:
        blocks = feature_blocks(grads, "adam", adam)
    result = {"args": vars(args), "dim_in": dim_in, "threads": torch.get_num_threads(), "machine": machine(),
              "per_example_s": {"grads_batched": batched.seconds / args.n, "grads_vmap": vmap.seconds / args.n,
                                "grads_loop": loop.seconds / args.n, "adam": precondition.seconds / args.n},
              "max_relative_diff_batched_vs_vmap": max_diff}
    kinds = ("sparse", "rademacher") if args.dense else ("sparse",)
    for kind in kinds:
        projector = Projector(ProjectionSpec(dim_in=dim_in, dim_out=args.dim, seed=0, kind=kind), args.device)
        projector.project_blocks([b[:1] for b in blocks])  # builds and caches the sparse sketch once
        with clock(sync) as projection:
            normalise(projector.project_blocks(blocks))
        result["per_example_s"][f"projection_{kind}"] = projection.seconds / args.n
    s = result["per_example_s"]
    for kind in kinds:
        total = s["grads_batched"] + s["adam"] + s[f"projection_{kind}"]
        result[f"total_{kind}_s"] = total
        result[f"projection_share_{kind}"] = s[f"projection_{kind}"] / total
    result["batched_speedup_over_loop"] = s["grads_loop"] / s["grads_batched"]
    result["vmap_speedup_over_loop"] = s["grads_loop"] / s["grads_vmap"]

    print(f"LoRA r={args.lora_r} on q,v: D = {dim_in:,} trainable entries; {args.n} examples x {args.length} tokens "
          f"({args.response} response); d = {args.dim}; {args.device}, {result['threads']} threads\n")
    total = result["total_sparse_s"]
    names = {"grads_batched": "gradients, batched LoRA hooks (forward + backward; the pipeline's)",
             "grads_vmap": "gradients, batched vmap (forward + backward)",
             "grads_loop": "gradients, naive per-example loop", "adam": "Adam preconditioning",
             "projection_sparse": "projection, sparse JL (default)",
             "projection_rademacher": "projection, dense Rademacher"}
    stages = [(name, f"{s[key]:.4f}",
               f"{s[key] / total:.1%}" if key in ("grads_batched", "adam", "projection_sparse") else "-")
              for key, name in names.items() if key in s]
    print(table(stages, ("stage", "seconds per example", "share of total (sparse projection)"), markdown=True))
    print(f"\nspeed-up over the loop: hooks {result['batched_speedup_over_loop']:.2f}x, vmap "
          f"{result['vmap_speedup_over_loop']:.2f}x (max relative difference {max_diff:.1e}); "
          f"projection share at d={args.dim}: "
          + ", ".join(f"{k} {result[f'projection_share_{k}']:.1%}" for k in kinds))
    print(f"wrote {write_json(Path(args.output).absolute(), result)}")


if __name__ == "__main__":
    main()
