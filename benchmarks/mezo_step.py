"""Memory and speed of a MeZO step against inference and first-order fine-tuning.

    python benchmarks/mezo_step.py --batch 16 --length 128 --repeats 5 --memory-runs 3

Setting: the embedded SmolLM2-135M in fp32, a classification batch of `batch` x `length` tokens
(random token ids, two single-token label words), the loss ftlab trains on.

Memory: each mode runs in fresh child processes (median of `memory-runs`): load the model and
batch, run one warm-up forward (so the lazily paged-in weights are resident), return freed memory to
the OS (`malloc_trim`), reset the peak-RSS counter (`5 > /proc/self/clear_refs`), run one step,
report VmHWM minus the RSS before the step. Children run with `MALLOC_MMAP_THRESHOLD_=65536`
(see MALLOC_ENV) so that RSS follows live tensors: peaks repeat to within 1 MiB.
Modes: an inference forward with the loss; two of them back to back; a ftlab MeZO step; the straightforward MeZO step
(z drawn 4 times with `torch.normal`, `p.data = p.data + ...`, as in the reference code); one
AdamW step with backprop on all parameters; and on LoRA r=8 (q, v).

Speed: one process, repeats in a shuffled order, median seconds of two consecutive forwards, a
ftlab MeZO step and the straightforward step; a step's overhead is its time minus two forwards.
Writes benchmarks/results/mezo_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from ftlab.memory import reset_peak, status_bytes

from _common import interleaved, machine, median, table, write_json

# glibc's default mmap threshold adapts upwards, so freed activations stay in the heap and
# whether a later allocation reuses them depends on fragmentation (+-30 MiB between identical
# runs). A fixed threshold maps every allocation over 64 KiB on its own and unmaps it when freed,
# so RSS follows the live tensors; applied to every mode alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MODES = ["forward", "two_forwards", "mezo", "mezo_straightforward", "adamw_full", "adamw_lora"]


def setup(batch: int, length: int):
    from ftlab import objectives
    from ftlab.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tokenizer), (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    option_ids = objectives.encode_options(tokenizer, [" negative", " positive"])
    gold = torch.randint(0, 2, (batch,), generator=gen)
    mb = objectives.ModelBatch(ids, mask, (mask.cumsum(-1) - 1), None, 2, gold)
    return model, (lambda m: objectives.loss(m, mb, option_ids))


def straightforward_mezo_step(params, loss, lr=1e-6, eps=1e-3, seed=0):
    """The reference design: z regenerated 4 times with torch.normal, out-of-place updates."""
    def perturb(scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    with torch.no_grad():
        perturb(1)
        plus = loss()
        perturb(-2)
        minus = loss()
        perturb(1)
        g = float(plus - minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - lr * g * z
    return plus


def make_step(mode: str, model, loss):
    from ftlab.zo import MeZO

    if mode == "forward":
        return lambda: torch.no_grad()(loss)(model)
    if mode == "two_forwards":  # what a MeZO step runs, without the perturbations
        return lambda: (torch.no_grad()(loss)(model), torch.no_grad()(loss)(model))
    if mode == "mezo":
        opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
        return lambda: opt.step(lambda: loss(model))
    if mode == "mezo_straightforward":
        params = list(model.parameters())
        return lambda: straightforward_mezo_step(params, lambda: loss(model))
    if mode in ("adamw_full", "adamw_lora"):
        module = model
        if mode == "adamw_lora":
            from ftlab.models import LoraSettings, apply_lora
            module = apply_lora(model, LoraSettings(r=8))
        module.train()
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            out = loss(module)
            out.backward()
            opt.step()
        return step
    raise ValueError(mode)


def child(mode: str, batch: int, length: int) -> None:
    model, loss = setup(batch, length)
    # A warm-up forward first: the loaded weights are paged in lazily, and that page-in (about
    # the model's size) would otherwise dominate every mode's "extra" memory.
    torch.no_grad()(loss)(model)
    step = make_step(mode, model, loss)
    print(json.dumps({"mode": mode, "extra_peak_mib": peak_extra(step) / 2**20}))


def peak_extra(fn) -> float:
    """Bytes of peak RSS during ``fn()`` over the RSS before it. The memory freed before is handed
    back to the OS first: otherwise a step may or may not reuse it (unseen by RSS) depending on heap
    fragmentation, which made "extra" swing by +-30 MiB."""
    before = reset_peak()
    fn()
    return status_bytes("VmHWM") - before


def memory(batch: int, length: int, runs: int) -> dict[str, float]:
    """Median over ``runs`` fresh processes per mode (the allocator's peak varies by ~30 MiB)."""
    out = {}
    for mode in MODES:
        peaks = []
        for _ in range(runs):
            res = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(batch),
                                  "--length", str(length)], capture_output=True, text=True, check=True,
                                 env={**os.environ, **MALLOC_ENV})
            peaks.append(json.loads(res.stdout.strip().splitlines()[-1])["extra_peak_mib"])
        out[mode] = median(peaks)
        print(f"  memory {mode}: {out[mode]:.0f} MiB (runs: {[round(p) for p in peaks]})", flush=True)
    return out


def speed(batch: int, length: int, repeats: int) -> dict[str, float]:
    model, loss = setup(batch, length)
    steps = {m: make_step(m, model, loss) for m in ("two_forwards", "mezo", "mezo_straightforward")}
    times = interleaved(steps, repeats)  # a fresh order each round, so drift does not favour one mode
    med = {m: median(t) for m, t in times.items()}
    med["forward"] = med.pop("two_forwards") / 2
    print(f"  speed: {med}", flush=True)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.length)

    mem = memory(args.batch, args.length, args.memory_runs)
    sec = speed(args.batch, args.length, args.repeats)
    fwd = sec["forward"]
    ours_over, naive_over = sec["mezo"] - 2 * fwd, sec["mezo_straightforward"] - 2 * fwd
    summary = {
        "mezo_memory_vs_forward": mem["mezo"] / mem["forward"],
        "mezo_memory_vs_two_forwards": mem["mezo"] / mem["two_forwards"],
        "adamw_full_vs_mezo_memory": mem["adamw_full"] / mem["mezo"],
        "adamw_lora_vs_mezo_memory": mem["adamw_lora"] / mem["mezo"],
        "mezo_step_vs_forward_time": sec["mezo"] / fwd,
        "overhead_ours_s": ours_over, "overhead_straightforward_s": naive_over,
        "overhead_ratio": ours_over / naive_over,
    }
    print("\n" + table([(m, f"{mem[m]:.0f}", f"{sec[m]:.2f}" if m in sec else "") for m in MODES],
                       ("mode", "extra peak memory (MiB)", "seconds"), markdown=True))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in summary.items()))
    write_json("mezo_step.json", {"batch": args.batch, "length": args.length, "threads": torch.get_num_threads(),
                                  "memory_mib": mem, "seconds": sec, "summary": summary, "machine": machine()})


if __name__ == "__main__":
    main()
