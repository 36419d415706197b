"""A MeZO step at 135M and ~1B parameters on the CPU, against the chunked design, the
straightforward design and the PyPI ``mezo`` package; and the operations a step issues up to 7B.

    # the PyPI peer in the benchmark's own environment, layered on .venv (its metadata pins
    # transformers<5 and datasets<3, which .venv does not have; its code imports only torch):
    /root/.pyenv/versions/3.11.7/bin/python3 -m venv benchmarks/.venv
    echo "import site; site.addsitedir('/work/main/.venv/lib/python3.11/site-packages')" \\
        > benchmarks/.venv/lib/python3.11/site-packages/zz_ftlab_venv.pth
    benchmarks/.venv/bin/pip install --no-deps mezo==0.0.1

    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only ops
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --models 135m --repeats 7 --memory-runs 3
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only speed --models 135m --repeats 7
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only memory --models 1b --memory-runs 1
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only speed --models 1b --repeats 3
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only passes --models 135m --repeats 5
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only passes --models 1b --repeats 3
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only focus --models 135m --repeats 9
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only focus --models 1b --repeats 5
    HF_HUB_OFFLINE=1 benchmarks/.venv/bin/python benchmarks/mezo_scale.py --only plot     # or --only report

(The second 135m line redid the speed part on the idle machine; the first ran beside other jobs.
On the idle 2-core machine: ops ~1 minute; 135m memory ~15 and speed ~6 minutes; 1b memory
~15, speed ~25, passes ~2, focus ~13 minutes. With .venv's python the ``mezo_pypi`` rows are
skipped.)

The PyPI ``mezo`` (0.0.1, MIT, author field Sadhika Malladi) is a small packaging of MeZO as plain
functions (``update``, ``perturb_parameters``, ``reconstruct_updates``, ``distributed_mezo_update``);
its README is the paper repository's and documents no API (it points to ``pip install
git+https://www.github.com/lebrice/MeZO``), so ``update`` is called as its signature says. Each
perturbation draws ``torch.randn`` of every parameter's shape and adds ``eps * z`` (two temporaries
of the parameter's size); the update redraws z and, for tensors of more than 100,000 entries, does
so row by row in a Python loop.

Models (``--models``): ``135m`` is the embedded SmolLM2-135M in fp32 (``benchmarks/mezo_step.py``'s
``setup``); ``1b`` a randomly initialised Llama-3.2-1B-shaped model (hidden 2048, 16 layers,
intermediate 8192, 32/8 heads, vocabulary 128256, tied embeddings; 1.24B parameters) in fp32,
its weights filled from one block of N(0, 0.02^2) draws (values do not change the cost). Both get
a classification batch of ``batch`` x ``length`` random tokens and ftlab's training loss.

Methods: ``forward`` (one forward with the loss, no_grad); ``mezo`` (ftlab's MeZO, the default
strided z generator); ``mezo_table`` (ftlab's earlier chunked design, ``generator="table"``,
chunks of 65536); ``straightforward`` (mezo_step.py's ``straightforward_mezo_step``: z drawn four
times with ``torch.normal``, out-of-place updates, as the MeZO reference code); ``mezo_pypi``
(``mezo.update`` of the PyPI package ``mezo`` 0.0.1, called as its signature says:
``update(model, inputs, loss_function, epsilon, learning_rate, random_seed)``).

Speed: one process per model, one warm-up call of each method, then ``repeats`` rounds in a
freshly shuffled order (so drift on this noisy machine hits every method alike); medians, each
step's ratio to one forward and its overhead beyond two forwards. Memory: as mezo_step.py (its
machinery is imported): each method in fresh child processes (median of ``memory-runs``), a
warm-up forward, ``malloc_trim``, reset of the peak RSS (``5 > /proc/self/clear_refs``), one
call, VmHWM minus the RSS before it, with ``MALLOC_MMAP_THRESHOLD_=65536``. ``mezo`` is its
first step (it makes the 4 MiB noise table and 4 MiB sign table); ``mezo_later`` a step after
one unmeasured step (tables made).

Operations (``--only ops``; seconds): ATen operations of one step outside its forwards
(``ftlab.zo.opcount``; compute ops are kernel launches on a GPU, views are metadata only),
for the SmolLM2-135M, Llama-3.2-1B and Llama-2-7B shapes built on the ``meta`` device: ftlab
strided, chunked table at chunks of 64K and 1M, the straightforward design and the PyPI peer.
The peer cannot run whole on meta (``torch.Generator(device="meta")`` is refused) and its update
loops in Python over the rows of every tensor over 100,000 entries (millions of operations at
7B), so its count is taken per distinct tensor shape on meta (with CPU generators; a long
tensor's row loop counted at two row counts and extended linearly) and summed; that
decomposition is checked against a whole ``mezo.update`` counted on a small CPU model every run.

Where the time goes (``--only passes``): one forward against one move of every parameter along
z (``MeZO._apply``; a step makes three) for each generator, and a floor (``p.mul_(1.0)`` of every
parameter). ``--only focus``: the step against one forward and two forwards back to back, alone
(more rounds in the same time; a step's speed is "two forwards" when the moves are cheap).

Results merge into benchmarks/results/mezo_scale.json (an entry per model, each with the machine
state it ran in); ``--plot`` draws benchmarks/results/mezo_scale.png from it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import torch
from mezo_step import MALLOC_ENV, peak_extra, straightforward_mezo_step
from mezo_step import make_step as mezo_step_make_step
from mezo_step import setup as smollm2_setup

from _common import RESULTS, clock, interleaved, median, package_version, read_json, table, write_json
from _common import machine as common_machine

JSON, PNG = RESULTS / "mezo_scale.json", RESULTS / "mezo_scale.png"
PEER = "mezo"  # the PyPI package (0.0.1), installed in benchmarks/.venv (see the docstring)
METHODS = ["forward", "mezo", "mezo_table", "straightforward", "mezo_pypi"]
MEMORY_MODES = METHODS + ["mezo_later"]
STEPS = [m for m in METHODS if m != "forward"]
# Llama shapes (transformers' LlamaConfig fields). 135m = SmolLM2-135M, 1b = Llama-3.2-1B,
# 7b = Llama-2-7B.
SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False, rope_theta=10000.0),
}
OPS_METHODS = [("strided", 1 << 16), ("table", 1 << 16), ("table", 1 << 20), ("straightforward", None),
               ("mezo_pypi", None)]
TARGETS = {"step_vs_forward": 2.1, "memory_vs_forward": 1.1}


# -- models and the loss ----------------------------------------------------------------------
def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])


def random_llama(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Llama of ``shape`` built on meta, then materialised on ``device`` and filled from one
    block of N(0, 0.02^2) draws (matrices; norms are ones): seconds instead of the ~40 s of
    transformers' own init at 1B on this CPU. The rotary buffers are rebuilt from the config."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own tensor: tie the LM head back
    width = 1 << 20
    block = (torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.02).to(device, dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2:
                p.fill_(1.0)
                continue
            flat, rows = p.view(-1), p.numel() // width
            if rows:
                flat[:rows * width].view(rows, width).copy_(block.expand(rows, width))
            if p.numel() % width:
                flat[rows * width:].copy_(block[:p.numel() % width])
        with torch.device(device):
            model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model.eval()


def meta_llama(shape: str):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(shape))


def classification_batch(vocab: int, batch: int, length: int, device: str = "cpu"):
    """(ModelBatch, option ids): ``batch`` x ``length`` random tokens, two classes, as
    mezo_step.setup makes them, with two fixed token ids as label words (no tokenizer needed)."""
    from ftlab import objectives

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    gold = torch.randint(0, 2, (batch,), generator=gen)
    mb = objectives.ModelBatch(ids, mask, mask.cumsum(-1) - 1, None, 2, gold).to(device)
    return mb, [[vocab // 3], [vocab // 2]]


def classification_loss(vocab: int, batch: int, length: int, device: str = "cpu"):
    """ftlab's training loss on :func:`classification_batch`, as a function of the model."""
    from ftlab import objectives

    mb, option_ids = classification_batch(vocab, batch, length, device)
    return lambda m: objectives.loss(m, mb, option_ids)


def setup(model: str, batch: int, length: int):
    """(model, loss) for a CPU measurement: the embedded SmolLM2-135M, or a random Llama shape."""
    if model == "135m":
        return smollm2_setup(batch, length)
    return random_llama(model), classification_loss(SHAPES[model]["vocab_size"], batch, length)


def peer():
    """The PyPI ``mezo`` package, or None when this interpreter does not have it."""
    try:
        import mezo
    except ImportError:
        return None
    return mezo


def make_step(method: str, model, loss):
    """A callable doing one ``method`` on ``model``: mezo_step.py's for the modes it has."""
    from ftlab.zo import MeZO

    if method in ("forward", "two_forwards", "mezo"):
        return mezo_step_make_step(method, model, loss)
    if method == "straightforward":
        return mezo_step_make_step("mezo_straightforward", model, loss)
    if method == "mezo_table":
        opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3, generator="table")
        return lambda: opt.step(lambda: loss(model))
    if method == "mezo_pypi":
        mezo, seeds = peer(), itertools.count()
        return lambda: mezo.update(model, None, lambda m, _: loss(m), epsilon=1e-3, learning_rate=1e-6,
                                   random_seed=next(seeds))
    raise ValueError(method)


def methods_here(methods: list[str]) -> list[str]:
    if peer() is None and "mezo_pypi" in methods:
        print(f"  (no {PEER!r} package in {sys.executable}: mezo_pypi skipped; see the docstring)")
        return [m for m in methods if m != "mezo_pypi"]
    return methods


def machine() -> dict:
    """_common's machine state, with the version of the PyPI peer (None without it)."""
    return common_machine(mezo_pypi=package_version(PEER))


# -- memory: fresh processes, mezo_step.py's protocol ------------------------------------------
def child(mode: str, model_name: str, batch: int, length: int) -> None:
    model, loss = setup(model_name, batch, length)
    torch.no_grad()(loss)(model)  # warm-up: weights paged in, allocator primed
    step = make_step("mezo" if mode == "mezo_later" else mode, model, loss)
    if mode == "mezo_later":
        step()  # the first step makes the noise and sign tables; measure the next one
    print(json.dumps({"mode": mode, "extra_peak_mib": peak_extra(step) / 2**20}))


def memory(model_name: str, batch: int, length: int, runs: int) -> dict:
    out = {}
    for mode in methods_here(MEMORY_MODES):
        peaks = []
        for _ in range(runs):
            res = subprocess.run([sys.executable, __file__, "--child", mode, "--models", model_name,
                                  "--batch", str(batch), "--length", str(length)], capture_output=True,
                                 text=True, env={**os.environ, **MALLOC_ENV})
            if res.returncode:
                raise RuntimeError(f"memory child {mode} failed:\n{res.stderr[-3000:]}")
            peaks.append(json.loads(res.stdout.strip().splitlines()[-1])["extra_peak_mib"])
        out[mode] = {"median": median(peaks), "runs": peaks}
        print(f"  memory {model_name} {mode}: {out[mode]['median']:.0f} MiB (runs: {[round(p) for p in peaks]})",
              flush=True)
    return out


# -- speed: one process, shuffled rounds -----------------------------------------------------
def speed(model_name: str, batch: int, length: int, repeats: int, methods: list[str] = METHODS) -> dict:
    model, loss = setup(model_name, batch, length)
    steps = {m: make_step(m, model, loss) for m in methods_here(methods)}
    for m, s in steps.items():  # warm-up (first-call allocations, the noise tables)
        with clock() as c:
            s()
        print(f"  warm-up {model_name} {m}: {c.seconds:.2f} s", flush=True)
    loads = []

    def after_round(r: int, times: dict[str, list[float]]) -> None:
        loads.append(os.getloadavg()[0])
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{m} {t[-1]:.2f}" for m, t in times.items()),
              flush=True)
    # a fresh order each round, so drift does not favour one method
    times = interleaved(steps, repeats, warmup=0, after_round=after_round)
    n_params = sum(p.numel() for p in model.parameters())
    return {"times": times, "round_load": loads, "params": n_params, "tensors": len(list(model.parameters()))}


def passes(model_name: str, batch: int, length: int, repeats: int) -> dict:
    """Where a step's time goes beyond its two forwards: one forward against one move of every
    parameter along z (``MeZO._apply``; a step makes three: +eps, -2 eps, restore + update), for
    the strided and the table generator, and a floor (``p.mul_(1.0)`` of every parameter: one
    read and one write, what any in-place move costs), interleaved as in :func:`speed`. The move is made with
    coefficient 0 (the same memory traffic; the weights stay as they are) and the strided
    generator's cached views are dropped first, as a step's first move makes them."""
    from ftlab.zo import MeZO

    model, loss = setup(model_name, batch, length)
    opts = {g: MeZO(model.parameters(), lr=1e-6, eps=1e-3, generator=g) for g in ("strided", "table")}

    def move(opt):
        opt._views.clear()
        opt._apply(1234, 0.0)
        opt._views.clear()
    params = list(model.parameters())

    @torch.no_grad()
    def floor():  # the least any in-place move costs: read and write every parameter once
        for p in params:
            p.mul_(1.0)
    fns = {"forward": make_step("forward", model, loss), "floor_pass": floor,
           **{f"{g}_pass": functools.partial(move, o) for g, o in opts.items()}}
    times = interleaved(fns, repeats)
    med = {m: median(t) for m, t in times.items()}
    out = {"times": times, "seconds": med, "load": os.getloadavg(),
           "three_passes_vs_forward": {m: 3 * med[m] / med["forward"] for m in med if m != "forward"}}
    print(f"  passes {model_name}: " + ", ".join(f"{m} {v:.2f} s" for m, v in med.items())
          + "; three passes / forward: " + ", ".join(f"{m} {v:.3f}" for m, v in out["three_passes_vs_forward"].items()),
          flush=True)
    return out


FOCUS = ["forward", "two_forwards", "mezo"]


def focus(model_name: str, batch: int, length: int, repeats: int) -> dict:
    """ftlab's step against one forward and two forwards back to back (what the step runs
    besides its moves), alone: more rounds in the same time than the full comparison."""
    out = {"load_before": os.getloadavg(), "speed": speed(model_name, batch, length, repeats, FOCUS)}
    out["load_after"] = os.getloadavg()
    t = out["speed"]["times"]
    paired = lambda a, b: median(x / y for x, y in zip(t[a], t[b]))  # noqa: E731
    med = {m: median(v) for m, v in t.items()}
    out["summary"] = {"seconds": med, "mezo_vs_forward": med["mezo"] / med["forward"],
                      "mezo_vs_forward_paired": paired("mezo", "forward"),
                      "mezo_vs_two_forwards_paired": paired("mezo", "two_forwards"),
                      "two_forwards_vs_forward_paired": paired("two_forwards", "forward")}
    print(f"  focus {model_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out["summary"].items() if k != "seconds"),
          flush=True)
    return out


def summarise(entry: dict) -> dict:
    """Medians, step / forward, overhead beyond two forwards, memory / forward, the targets."""
    med = {m: median(t) for m, t in entry["speed"]["times"].items()}
    fwd = med["forward"]
    times = entry["speed"]["times"]
    out = {"seconds": med, "step_vs_forward": {m: med[m] / fwd for m in med if m != "forward"},
           # the median over rounds of (step / forward of the same round): load that changes
           # from round to round cancels out
           "step_vs_forward_paired": {m: median(s / f for s, f in zip(times[m], times["forward"]))
                                      for m in med if m != "forward"},
           "overhead_s": {m: med[m] - 2 * fwd for m in med if m != "forward"}}
    if "memory" in entry:
        mem = {m: v["median"] for m, v in entry["memory"].items()}
        out["memory_mib"] = mem
        out["memory_vs_forward"] = {m: mem[m] / mem["forward"] for m in mem if m != "forward"}
    peers = [m for m in ("straightforward", "mezo_pypi") if m in med]
    out["targets"] = {
        f"mezo step <= {TARGETS['step_vs_forward']}x forward (both ratios)":
            max(out["step_vs_forward"]["mezo"], out["step_vs_forward_paired"]["mezo"]) <= TARGETS["step_vs_forward"],
        "mezo faster than " + " and ".join(peers): all(med["mezo"] < med[p] for p in peers),
    }
    if "memory_vs_forward" in out:
        out["targets"][f"mezo step memory <= {TARGETS['memory_vs_forward']}x forward"] = \
            out["memory_vs_forward"]["mezo"] <= TARGETS["memory_vs_forward"]
    return out


# -- operations per step, on meta ------------------------------------------------------------
@contextmanager
def cpu_generators():
    """``torch.Generator(device="meta")`` is refused; give the peer CPU generators on meta
    (meta kernels ignore the generator, and the generator makes no ATen call)."""
    real = torch.Generator
    torch.Generator = lambda device="cpu": real("cpu" if str(device) == "meta" else device)
    try:
        yield
    finally:
        torch.Generator = real


def peer_tensor_ops(shape: tuple[int, ...], device: str) -> tuple[int, int]:
    """(compute, views) the peer's step spends on one tensor of ``shape``: three perturbations
    and the update. The peer updates a tensor of more than ``max_params_at_a_time`` entries row
    by row (a Python loop, the same work per row), so for a long tensor the update is counted at
    the fewest rows that take that branch, k, and at k + 1, and extended linearly to all rows
    (exact for that loop; the whole-step check in check_peer_decomposition covers it)."""
    import inspect
    import math

    from ftlab.zo.opcount import OpCounter

    mezo = peer()
    limit = inspect.signature(mezo.mezo.update_param).parameters["max_params_at_a_time"].default

    def count(rows: int | None, perturb: bool) -> tuple[int, int]:
        p = torch.nn.Parameter(torch.empty(shape if rows is None else (rows, *shape[1:]), device=device))
        grad = torch.tensor(0.5)  # the projected gradient: a 0-d tensor, made outside the count
        with cpu_generators(), torch.no_grad(), OpCounter() as c:
            if perturb:
                for scale in (1e-3, -2e-3, 1e-3):
                    mezo.mezo.perturb_parameters([p], scale, 0)
            else:
                mezo.mezo.update_params([p], random_seed=0, learning_rate=1e-6, projected_grad=grad)
        return c.compute, c.views

    perturb = count(None, True)
    rows, row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    k = limit // row + 1
    if math.prod(shape) <= limit or k + 1 >= rows:
        update = count(None, False)
    else:
        a, b = count(k, False), count(k + 1, False)
        update = tuple(x + (rows - k) * (y - x) for x, y in zip(a, b))
    return perturb[0] + update[0], perturb[1] + update[1]


def peer_step_ops(model, device: str) -> dict:
    """The peer's whole step as the sum of its per-tensor work (by distinct shape) plus its
    scalar work on the two losses (the projected gradient)."""
    from collections import Counter

    from ftlab.zo.opcount import OpCounter

    shapes = Counter(tuple(p.shape) for p in model.parameters() if p.requires_grad)
    compute = views = 0
    for shape, count in shapes.items():
        c, v = peer_tensor_ops(shape, device)
        compute, views = compute + count * c, views + count * v
    plus, minus = torch.tensor(1.0), torch.tensor(0.5)
    with OpCounter() as c:
        (plus - minus) / (2 * 1e-3)
    return {"compute": compute + c.compute, "views": views + c.views}


def count_ops(model, method: str, chunk: int | None, device: str) -> dict:
    """Operations of one step of ``method`` on ``model`` (its forwards excluded: a constant loss)."""
    from ftlab.zo import MeZO
    from ftlab.zo.directions import noise_table, sign_table
    from ftlab.zo.opcount import OpCounter, count_step_ops

    params = list(model.parameters())
    dtype = params[0].dtype
    if method in ("strided", "table"):
        noise_table("gaussian", str(params[0].device), dtype)  # made once per device (first step)
        sign_table(str(params[0].device), dtype)
        opt = MeZO(params, lr=1e-6, eps=1e-3, generator=method, chunk_size=chunk, exact=False)
        c = count_step_ops(opt)
        out = {"compute": c.compute, "views": c.views}
    elif method == "straightforward":
        with OpCounter() as c:
            straightforward_mezo_step(params, lambda: 1.0)
        out = {"compute": c.compute, "views": c.views}
    elif method == "mezo_pypi":
        out = peer_step_ops(model, device)
    else:
        raise ValueError(method)
    return {**out, "per_tensor": out["compute"] / len(params)}


def check_peer_decomposition() -> bool:
    """The per-shape count of the peer equals a whole ``mezo.update`` counted on a small CPU
    model (whose tensors take both of its update branches: over and under 100,000 entries)."""
    from ftlab.zo.opcount import OpCounter

    torch.manual_seed(0)
    model = random_llama("tiny")  # vocabulary 2048 x 64 = 131072 entries: updated row by row
    loss = torch.tensor(1.0)
    with OpCounter() as c:
        peer().update(model, None, lambda m, _: loss, 1e-3, 1e-6, 0)
    whole = {"compute": c.compute, "views": c.views}
    ok = whole == peer_step_ops(model, "cpu") == peer_step_ops(meta_llama("tiny"), "meta")
    print(f"  peer count by shape == whole-step count on CPU ({whole}): {ok}")
    return ok


def ops(shapes: list[str]) -> dict:
    out: dict = {"methods": [f"{m}" + (f"@{c}" if c else "") for m, c in OPS_METHODS], "shapes": {}}
    if peer() is not None:
        out["peer_decomposition_checked"] = check_peer_decomposition()
    for shape in shapes:
        model = meta_llama(shape)
        params = list(model.parameters())
        entry = {"tensors": len(params), "params": sum(p.numel() for p in params), "ops": {}}
        for method, chunk in OPS_METHODS:
            if method == "mezo_pypi" and peer() is None:
                continue
            name = method + (f"@{chunk}" if chunk else "")
            with clock() as c:
                entry["ops"][name] = count_ops(model, method, chunk, "meta")
            entry["ops"][name]["count_s"] = c.seconds
        out["shapes"][shape] = entry
        print(f"  ops {shape}: {len(params)} tensors, " + ", ".join(
            f"{k} {v['compute']}" for k, v in entry["ops"].items()), flush=True)
    return out


# -- output ----------------------------------------------------------------------------------
def print_cpu(name: str, entry: dict) -> None:
    s = entry["summary"]
    rows = []
    for m in METHODS + ["mezo_later"]:
        sec = s["seconds"].get(m)
        mem = s.get("memory_mib", {}).get(m)
        if sec is None and mem is None:
            continue
        rows.append((m, f"{sec:.2f}" if sec is not None else "",
                     f"{s['step_vs_forward'][m]:.2f}" if m in s["step_vs_forward"] else ("1" if m == "forward" else ""),
                     f"{s['step_vs_forward_paired'][m]:.2f}" if m in s.get("step_vs_forward_paired", {}) else "",
                     f"{s['overhead_s'][m]:+.2f}" if m in s["overhead_s"] else "",
                     f"{mem:.0f}" if mem is not None else "",
                     f"{s['memory_vs_forward'][m]:.2f}" if m in s.get("memory_vs_forward", {}) else
                     ("1" if m == "forward" and mem is not None else "")))
    print(f"\n{name}: {entry['params'] / 1e6:.0f}M parameters in {entry['tensors']} tensors, batch "
          f"{entry['batch']} x {entry['length']}, {entry['repeats']} rounds; load average before "
          f"{entry['load_before'][0]:.2f}, after {entry['load_after'][0]:.2f}; 1-min load at each round "
          f"{[round(x, 1) for x in entry['speed'].get('round_load', [])]}")
    print(table(rows, ("method", "median s", "step / forward", "per-round step / forward (median)",
                       "overhead beyond 2 forwards (s)", "extra peak MiB", "memory / forward"), markdown=True))
    for k, v in s["targets"].items():
        print(f"  target {k}: {'met' if v else 'MISSED'}")
    if "passes" in entry:
        p = entry["passes"]
        print(f"  one move of all parameters along z (--only passes, load {p['load'][0]:.1f}): "
              + ", ".join(f"{m} {v:.3f} s" for m, v in p["seconds"].items() if m != "forward")
              + f" vs forward {p['seconds']['forward']:.2f} s; three moves / forward: "
              + ", ".join(f"{m} {v:.3f}" for m, v in p["three_passes_vs_forward"].items()))
    if "focus" in entry:
        f = entry["focus"]
        print(f"  focus (--only focus, {len(f['speed']['times']['mezo'])} rounds, load "
              f"{f['load_before'][0]:.1f}-{f['load_after'][0]:.1f}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in f["summary"].items() if k != "seconds")
              + "; seconds " + ", ".join(f"{k} {v:.2f}" for k, v in f["summary"]["seconds"].items()))


def print_ops(result: dict) -> None:
    methods = result["methods"]
    rows = []
    for shape, e in result["shapes"].items():
        rows.append((shape, f"{e['params'] / 1e9:.2f}B", e["tensors"],
                     *(f"{e['ops'][m]['compute']:,} ({e['ops'][m]['per_tensor']:.1f}/tensor)" if m in e["ops"] else ""
                       for m in methods)))
    print("\ncompute ops (kernel launches on a GPU) per step, forwards excluded:")
    print(table(rows, ("shape", "params", "tensors", *methods), markdown=True))


LABELS = {"mezo": "ftlab MeZO (strided)", "mezo_table": "ftlab chunked table (64K)", "straightforward":
          "straightforward (4 x torch.normal)", "mezo_pypi": "PyPI mezo 0.0.1", "strided@65536": "ftlab strided",
          "table@65536": "chunked table, 64K chunks", "table@1048576": "chunked table, 1M chunks"}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    models = [m for m in ("135m", "1b") if m in results.get("cpu", {})]
    width = 0.8 / len(STEPS)
    for i, method in enumerate(STEPS):
        vals = [results["cpu"][m]["summary"]["step_vs_forward"].get(method, 0) for m in models]
        bars = ax1.bar([j + i * width for j in range(len(models))], vals, width, label=LABELS.get(method, method))
        ax1.bar_label(bars, fmt="%.2f", fontsize=7)
    ax1.axhline(2, color="grey", lw=0.8, ls=":", label="two forwards")
    ax1.axhline(TARGETS["step_vs_forward"], color="red", lw=0.8, ls="--", label="target (2.1x)")
    ax1.set_xticks([j + width * (len(STEPS) - 1) / 2 for j in range(len(models))],
                   [f"{m} (fp32, CPU, load {results['cpu'][m]['load_before'][0]:.1f})" for m in models])
    ax1.set_ylabel("step time / one forward")
    ax1.set_title("MeZO step on the CPU, in forwards")
    ax1.legend(fontsize=7)
    shapes = list(results.get("ops", {}).get("shapes", {}))
    methods = results.get("ops", {}).get("methods", [])
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        vals = [results["ops"]["shapes"][s]["ops"].get(method, {}).get("compute", 0) for s in shapes]
        ax2.bar([j + i * width for j in range(len(shapes))], vals, width, label=LABELS.get(method, method))
    ax2.set_yscale("log")
    ax2.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(shapes))],
                   [f"{s} ({results['ops']['shapes'][s]['tensors']} tensors)" for s in shapes])
    ax2.set_ylabel("compute ops per step (log)")
    ax2.set_title("operations a step issues beyond its forwards")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)
    print(f"wrote {PNG}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="135m,1b", help="comma-separated: 135m, 1b")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model")
    parser.add_argument("--memory-runs", type=int, default=3, help="child processes per memory mode")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--only", choices=["ops", "speed", "memory", "passes", "focus", "plot", "report"],
                        help="passes: a forward against one move of the parameters along z; focus: ftlab's "
                             "step against one and two forwards, alone (neither is in a full run)")
    parser.add_argument("--ops-shapes", default="135m,1b,7b")
    parser.add_argument("--plot", action="store_true", help=f"draw {PNG.name} from the results JSON")
    parser.add_argument("--child", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.child:
        return child(args.child, models[0], args.batch, args.length)

    results = read_json(JSON, {})
    results.setdefault("cpu", {})
    if args.only == "report":  # the tables of the results JSON (nothing is measured or written)
        if "ops" in results:
            print_ops(results["ops"])
        for name, entry in results["cpu"].items():
            if "summary" in entry:
                print_cpu(name, entry)
        return
    print(f"machine: {machine()}", flush=True)
    if args.only in (None, "ops"):
        results["ops"] = {"machine": machine(), **ops(args.ops_shapes.split(","))}
        print_ops(results["ops"])
    for name in models if args.only in ("passes", "focus") else []:
        run = passes if args.only == "passes" else focus
        results["cpu"].setdefault(name, {})[args.only] = run(name, args.batch, args.length, args.repeats)
    for name in models if args.only in (None, "speed", "memory") else []:
        entry = {"batch": args.batch, "length": args.length, "repeats": args.repeats,
                 "memory_runs": args.memory_runs, "load_before": os.getloadavg(), "machine": machine(),
                 "command": " ".join(sys.argv)}
        old = results["cpu"].get(name, {})
        entry.update({k: old[k] for k in ("passes", "focus") if k in old})
        if args.only != "speed":
            entry["memory"] = memory(name, args.batch, args.length, args.memory_runs)
        elif "memory" in old:
            entry["memory"], entry["memory_from"] = old["memory"], old.get("machine", {}).get("time")
        if args.only != "memory":
            entry["speed"] = speed(name, args.batch, args.length, args.repeats)
        elif "speed" in old:
            entry["speed"], entry["speed_from"] = old["speed"], old.get("machine", {}).get("time")
        entry["load_after"] = os.getloadavg()
        results["cpu"][name] = entry
        if "speed" in entry:
            entry["params"], entry["tensors"] = entry["speed"]["params"], entry["speed"]["tensors"]
            entry["summary"] = summarise(entry)
            print_cpu(name, entry)
        write_json(JSON, results)
    for entry in results["cpu"].values():  # summaries of earlier runs in this script's current form
        if "speed" in entry:
            entry["summary"] = summarise(entry)
    print(f"wrote {write_json(JSON, results)}")
    if args.plot or args.only == "plot":
        plot(results)


if __name__ == "__main__":
    main()
