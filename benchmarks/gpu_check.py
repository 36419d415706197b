"""Every GPU measurement of the MeZO-at-scale issue in one script, for one run on a lent GPU.

    OUT=/path/to/out python benchmarks/gpu_check.py                       # H100/H200, a few minutes
    OUT=/tmp/gpucheck HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny  # smoke test

Models: randomly initialised Llama shapes in bf16 (``benchmarks/mezo_scale.py``'s ``SHAPES`` and
``random_llama``; nothing is downloaded): SmolLM2-135M's shape and Llama-3.2-1B's (1.24B
parameters), a classification batch of ``batch`` x ``length`` random tokens and ftlab's training
loss (``--tiny``: a 2-layer, 64-wide Llama, batch 2 x 16).

Per model:
  * time (median of ``repeats`` rounds in a freshly shuffled order, after one warm-up call each;
    wall clock, ``torch.cuda.synchronize`` before and after each call) of one forward
    (loss, no_grad); ftlab's MeZO step with the strided generator in exact mode (``mezo``: the
    default for bf16, perturbed inside module forwards, see ftlab.zo.mezo; on a second copy of
    the model, so its hooks do not slow the other methods' forwards) and in place
    (``mezo_inplace``, ``exact=False``); the chunked table design (``mezo_table``,
    ``generator="table"``, in place); and the straightforward design (mezo_step.py: z drawn 4
    times with ``torch.normal``); their ratio to one forward and overhead beyond two forwards;
  * ATen operations of one step (``ftlab.zo.opcount``; compute ops are kernel launches) on the
    device model: strided, table, straightforward (in place; exact mode's moves happen inside
    the forwards and are not in this count);
  * peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each call, after the
    warm-up, so the noise tables already exist) of each call over the memory allocated before it
    (both model copies, the batch, the tables); ``weights_mib`` is one copy's weights.

Offload (the ``# --- offload ---`` section): on the 1B shape, if ``ftlab.zo.offload.OffloadedMeZO``
exists, ordinary MeZO alone on the device against offloaded MeZO (weights in CPU memory): step
time and absolute peak GPU memory; "not available" is recorded when the module is missing.

Every measurement is in its own try/except (an error is recorded, the rest goes on); the JSON is
rewritten after each model: ``$OUT/gpu_check.json`` (``OUT`` unset: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch
from mezo_scale import SHAPES, classification_batch, count_ops, make_step, random_llama

from _common import RESULTS, clock, machine, median, table, timed, write_json

try:
    import ftlab  # noqa: F401
except ImportError:  # the repository without an installed ftlab (the lent machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OUT = Path(os.environ.get("OUT") or RESULTS).absolute()
JSON = OUT / "gpu_check.json"
METHODS = ["forward", "mezo", "mezo_inplace", "mezo_table", "straightforward"]
OPS = [("strided", 1 << 16), ("table", 1 << 16), ("straightforward", None)]


def error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    with clock(lambda: sync(device)) as c:
        fn()
    return c.seconds


def peak_memory(fn, device: torch.device) -> dict:
    """MiB: the peak allocated during ``fn`` over what was allocated before it, and absolute."""
    if device.type != "cuda":
        return {"extra_mib": None, "peak_mib": None, "note": "GPU memory only"}
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"extra_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20, "before_mib": before / 2**20}


def steps_for(model, hooked, loss):
    """The timed callables. ``mezo`` is ftlab's default for bf16 (exact mode), on ``hooked``, a
    second copy of the model: exact mode hooks every module holding parameters, and those hooks
    (idle outside an exact step) would otherwise slow every other method's forwards too."""
    from ftlab.zo import MeZO

    out = {m: make_step(m, model, loss) for m in ("forward", "straightforward")}
    exact = MeZO(hooked.parameters(), lr=1e-6, eps=1e-3)  # exact=None: on for bf16/fp16
    exact.attach(hooked)
    inplace = MeZO(model.parameters(), lr=1e-6, eps=1e-3, exact=False)
    table = MeZO(model.parameters(), lr=1e-6, eps=1e-3, exact=False, generator="table")
    out["mezo"] = lambda: exact.step(lambda: loss(hooked))
    out["mezo_inplace"] = lambda: inplace.step(lambda: loss(model))
    out["mezo_table"] = lambda: table.step(lambda: loss(model))
    return out, exact.exact


def measure_model(shape: str, args, device: torch.device, dtype: torch.dtype, res: dict) -> None:
    from ftlab import objectives

    entry = res.setdefault("models", {}).setdefault(shape, {})
    model, hooked = random_llama(shape, str(device), dtype), random_llama(shape, str(device), dtype)
    mb, option_ids = classification_batch(SHAPES[shape]["vocab_size"], args.batch, args.length, str(device))

    def loss(m):
        return objectives.loss(m, mb, option_ids)
    params = list(model.parameters())
    entry.update(params=sum(p.numel() for p in params), tensors=len(params), dtype=str(dtype),
                 weights_mib=sum(p.numel() * p.element_size() for p in params) / 2**20,
                 batch=args.batch, length=args.length, repeats=args.repeats)
    steps, exact = steps_for(model, hooked, loss)
    entry["mezo_exact_mode"] = exact
    times: dict[str, list[float]] = {}
    for m, fn in steps.items():  # warm-up (kernels, cuBLAS handles, the noise tables)
        try:
            entry.setdefault("warmup_s", {})[m] = seconds(fn, device)
            times[m] = []
        except Exception as e:  # noqa: BLE001
            entry.setdefault("errors", {})[m] = error(e)
    order = list(times)
    for r in range(args.repeats):
        random.Random(r).shuffle(order)
        for m in order:
            try:
                times[m].append(seconds(steps[m], device))
            except Exception as e:  # noqa: BLE001
                entry.setdefault("errors", {})[m] = error(e)
    med = {m: median(t) for m, t in times.items() if t}
    entry["times"], entry["seconds"] = times, med
    if "forward" in med:
        fwd = med["forward"]
        entry["step_vs_forward"] = {m: med[m] / fwd for m in med if m != "forward"}
        entry["overhead_s"] = {m: med[m] - 2 * fwd for m in med if m != "forward"}
    print(f"  {shape}: seconds {({m: round(v, 4) for m, v in med.items()})}", flush=True)
    for m in steps:
        try:
            entry.setdefault("memory", {})[m] = peak_memory(steps[m], device)
        except Exception as e:  # noqa: BLE001
            entry.setdefault("memory", {})[m] = error(e)
    for method, chunk in OPS:
        name = method + (f"@{chunk}" if chunk else "")
        try:
            entry.setdefault("ops", {})[name] = count_ops(model, method, chunk, str(device))
        except Exception as e:  # noqa: BLE001
            entry.setdefault("ops", {})[name] = error(e)
    del steps, model, hooked, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- offload ---
def offload_check(shape: str, args, device: torch.device, dtype: torch.dtype, res: dict) -> None:
    """Offloaded MeZO (``ftlab.zo.offload``: weights in CPU memory, blocks brought to the device
    one at a time, both perturbations in one lockstep forward over the doubled batch) against
    ordinary MeZO (weights resident, ftlab's default exact mode for bf16), each alone on the
    device: step time and absolute peak device memory (weights included)."""
    out = res.setdefault("offload", {"shape": shape})
    try:
        from ftlab.zo.offload import OffloadedMeZO
    except ImportError as e:
        out.update(status="not available", error=str(e))
        return
    from ftlab import objectives
    from ftlab.zo import MeZO

    mb, option_ids = classification_batch(SHAPES[shape]["vocab_size"], args.batch, args.length, str(device))

    def run(name: str, build) -> None:
        try:
            step, cleanup = build()
            try:
                rec = {"warmup_s": seconds(step, device)}
                rec["times"] = timed(step, args.repeats, warmup=0, sync=lambda: sync(device))
                rec["seconds"] = median(rec["times"])
                rec["memory"] = peak_memory(step, device)
            finally:
                cleanup()
            out[name] = rec
        except Exception as e:  # noqa: BLE001
            out[name] = error(e)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def ordinary():
        model = random_llama(shape, str(device), dtype)
        opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
        opt.attach(model)
        return (lambda: opt.step(lambda: objectives.loss(model, mb, option_ids))), (lambda: None)

    def offloaded():
        model = random_llama(shape, "cpu", dtype)  # the weights stay in CPU memory
        two = objectives.doubled(mb)
        opt = OffloadedMeZO(list(model.parameters()), model=model, device=device, lr=1e-6, eps=1e-3)
        closure = torch.no_grad()(lambda: objectives.lockstep_loss(model, two, option_ids))

        def cleanup():
            opt.flush()
            if hasattr(opt, "close"):
                opt.close()
        return (lambda: opt.step(closure)), cleanup

    run("ordinary", ordinary)
    run("offloaded", offloaded)
    a, b = out.get("ordinary", {}), out.get("offloaded", {})
    out["status"] = "ok" if "seconds" in a and "seconds" in b else "failed"
    if out["status"] == "ok":
        out["time_vs_ordinary"] = b["seconds"] / a["seconds"]
        if a["memory"].get("peak_mib"):
            out["peak_vs_ordinary"] = b["memory"]["peak_mib"] / a["memory"]["peak_mib"]


def report(res: dict) -> None:
    rows = []
    for shape, e in res.get("models", {}).items():
        sec, mem = e.get("seconds", {}), e.get("memory", {})
        fwd_mem = (mem.get("forward") or {}).get("extra_mib")
        for m in METHODS:
            s, mm = sec.get(m), (mem.get(m) or {})
            extra = mm.get("extra_mib")
            rows.append((shape, m,
                         f"{s * 1e3:.1f}" if s is not None else (e.get("errors", {}).get(m, {}).get("error", "")),
                         f"{e.get('step_vs_forward', {}).get(m, 1 if m == 'forward' else float('nan')):.2f}",
                         f"{extra:.0f}" if extra is not None else mm.get("error", ""),
                         f"{extra / fwd_mem:.2f}" if extra is not None and fwd_mem else "",
                         f"{mm['peak_mib']:.0f}" if mm.get("peak_mib") is not None else ""))
    print(table(rows, ("model", "method", "median ms", "step / forward", "extra peak MiB",
                       "extra / forward's", "peak MiB (2 model copies)"), markdown=True))
    rows = [(shape, e.get("tensors"), *(v.get("compute", v.get("error")) for v in e.get("ops", {}).values()))
            for shape, e in res.get("models", {}).items()]
    names = next(iter(res.get("models", {}).values()), {}).get("ops", {}).keys()
    print("\ncompute ops per step (device):")
    print(table(rows, ("model", "tensors", *names), markdown=True))
    off = res.get("offload", {})
    print(f"\noffload ({off.get('shape')}): {off.get('status')} {off.get('error', '')}")
    for name in ("ordinary", "offloaded"):
        rec = off.get(name, {})
        if "seconds" in rec:
            print(f"  {name}: step {rec['seconds'] * 1e3:.1f} ms, peak {rec['memory'].get('peak_mib')} MiB")
        elif rec:
            print(f"  {name}: {rec.get('error')}")
    if off.get("status") == "ok":
        print(f"  offloaded / ordinary: time {off['time_vs_ordinary']:.2f}x, peak memory {off.get('peak_vs_ordinary')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide Llama, batch 2 x 16 (smoke test)")
    parser.add_argument("--shapes", default=None, help="default 135m,1b (tiny with --tiny)")
    parser.add_argument("--offload-shape", default=None, help="default 1b (tiny with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (3 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (2 with --tiny)")
    parser.add_argument("--length", type=int, default=None, help="default 128 (16 with --tiny)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    tiny = args.tiny
    args.shapes = (args.shapes or ("tiny" if tiny else "135m,1b")).split(",")
    args.offload_shape = args.offload_shape or ("tiny" if tiny else "1b")
    args.repeats = args.repeats or (3 if tiny else 10)
    args.batch, args.length = args.batch or (2 if tiny else 16), args.length or (16 if tiny else 128)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    res: dict = {"command": " ".join(sys.argv), "device": str(device), "dtype": args.dtype}
    try:
        res["machine"] = machine()  # with the GPU's name when CUDA is available
    except Exception as e:  # noqa: BLE001
        res["machine"] = error(e)
    start = time.time()
    for shape in args.shapes:
        print(f"{shape} ...", flush=True)
        try:
            measure_model(shape, args, device, dtype, res)
        except Exception as e:  # noqa: BLE001
            res.setdefault("models", {}).setdefault(shape, {})["error"] = error(e)
        write_json(JSON, res)
    try:  # --- offload --- (ftlab.zo.offload.OffloadedMeZO, "not available" without the module)
        offload_check(args.offload_shape, args, device, dtype, res)
    except Exception as e:  # noqa: BLE001
        res.setdefault("offload", {}).update(status="failed", **error(e))
    res["wall_s"] = time.time() - start
    write_json(JSON, res)
    try:
        report(res)
    except Exception as e:  # noqa: BLE001
        print("report failed:", error(e)["error"])
    print(f"wrote {JSON} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
