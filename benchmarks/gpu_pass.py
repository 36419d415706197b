"""Where the time of a MeZO pass goes on a GPU: one pass ``theta += c z`` over every tensor of a
model, the strided design against bandwidth references, on the same weights.

    OUT=/path python benchmarks/gpu_pass.py --shape 1b            # on the lent GPU (~30 s)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_pass.py --shape tiny --device cpu

Times (wall clock, the device synchronised before and after each call; median of ``repeats`` after
one warm-up), per pass over all parameters:
  * ``strided``: ``MeZO._apply`` (views made afresh, as in the first pass of a step);
  * ``strided_cached``: the same with the step's views already made (the second and third passes);
  * ``contiguous_add``: ``p.add_(z)`` with a preallocated contiguous z per tensor (the floor of
    any design that reads z from memory: read p, read z, write p);
  * ``contiguous_addcmul``: ``addcmul_`` with contiguous z shaped (rows, C) and a (rows, 1) sign;
  * ``scale_only``: ``p.mul_(1)``, read and write p (the floor of any in-place pass).
Writes $OUT/gpu_pass.json (benchmarks/results/ when OUT is unset).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from mezo_scale import random_llama

from _common import RESULTS, machine, median, timed, write_json

try:
    import ftlab  # noqa: F401
except ImportError:  # the repository without an installed ftlab (the lent machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from ftlab.zo import MeZO

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = random_llama(args.shape, device=args.device, dtype=dtype)
    params = [p for p in model.parameters()]
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = MeZO(params, lr=0.0, eps=1e-3, exact=False)
    chunk = opt.chunk_size
    zs = [torch.randn_like(p) for p in params]
    rows = [(p.numel() // chunk, p.numel() % chunk) for p in params]
    signs = [torch.ones(max(r, 1), 1, device=args.device, dtype=dtype) for r, _ in rows]
    seed = [0]

    def strided():
        seed[0] += 1
        opt._views.clear()
        opt._apply(seed[0], 1e-3)

    def strided_cached():
        opt._apply(12345, 1e-3)

    def contiguous_add():
        with torch.no_grad():
            for p, z in zip(params, zs):
                p.add_(z, alpha=1e-3)

    def contiguous_addcmul():
        with torch.no_grad():
            for p, z, s, (r, t) in zip(params, zs, signs, rows):
                if r:
                    p.view(-1)[:r * chunk].view(r, chunk).addcmul_(z.view(-1)[:r * chunk].view(r, chunk), s[:r],
                                                                   value=1e-3)
                if t:
                    p.view(-1)[r * chunk:].add_(z.view(-1)[r * chunk:], alpha=1e-3)

    def scale_only():
        with torch.no_grad():
            for p in params:
                p.mul_(1.0)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    results = {}
    with torch.no_grad():
        for name, fn in [("strided", strided), ("strided_cached", strided_cached), ("contiguous_add", contiguous_add),
                         ("contiguous_addcmul", contiguous_addcmul), ("scale_only", scale_only)]:
            s = median(timed(fn, args.repeats, sync=sync))
            results[name] = {"s": s, "GB_per_s_of_param_rw": 2 * n_bytes / s / 1e9}
            print(f"{name:<20} {s * 1000:8.2f} ms   {2 * n_bytes / s / 1e9:8.1f} GB/s (2 x param bytes / time)")
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype, "param_bytes": n_bytes,
            "tensors": len(params), "chunk": chunk, "results": results, "machine": machine()}
    write_json(Path(os.environ.get("OUT") or RESULTS).absolute() / "gpu_pass.json", info)


if __name__ == "__main__":
    main()
