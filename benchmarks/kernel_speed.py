"""eNTK computation speed on SmolLM2-135M: the batched per-example Jacobians that
:func:`ftlab.kernel.compute_kernel` computes per chunk (for LoRA weights: one batched forward and
one backward per output, :mod:`ftlab.grads.lora`) against a straightforward loop (one
forward per example, one backward per label word, gradients flattened), and optionally
(``--vmap``) against the generic ``vmap(jacrev)`` path. The methods alternate chunk by chunk on
the same rows (timing the per-example Jacobians, which is where all the time goes), so the load
of other processes on a shared machine hits all alike; the kernels built from them are compared.

Both compute the SGD and sign kernels of the label-word logits w.r.t. the LoRA parameters
(q_proj, v_proj, r=8: 460,800 entries; seeded peft init) for ``--n-train`` training rows and
``--n-test`` test rows of the sentiment task. The cost of both is linear in the number of rows
(one Jacobian per row; the kernel products are negligible), so the time for 64 + 500 rows is
reported as the measured per-row time times 564 (or measured, with ``--n-test 500``). Rows are
sorted and chunked by prompt length as ``compute_kernel`` does (``--chunk-size``,
``--max-padding``); the JSON keeps every chunk's rows, tokens and times, and a least-squares fit
``seconds = per_row * rows + per_token * tokens`` per method (``--refit`` adds it to an
existing JSON).

It also measures the error of the projected kernel on SmolLM2: the batched Jacobians projected
to ``--projection-dim`` with the LESS projector (what ``compute_kernel`` does for large parameter
sets) against the exact kernel, as relative Frobenius errors. Prints a table, writes
``benchmarks/results/kernel_speed.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kernel_speed.py --n-train 64 --n-test 16
    python benchmarks/kernel_speed.py --n-train 64 --n-test 500 --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ftlab.grads.projection import ProjectionSpec, Projector
from ftlab.kernel import select_parameters
from ftlab.kernel.chunks import plan_rows
from ftlab.kernel.jacobians import flat, jacobians_and_outputs, vmap_jacobians_and_outputs
from ftlab.kernel.outputs import OutputFunction, eager_attention, encode_rows, label_word_ids
from ftlab.models import LoraSettings, load_model, prepare_model
from ftlab.objectives import Encoder
from ftlab.tasks import load_task, make_splits

from _common import RESULTS, clock, machine, table, write_json

LABELS = {"batched": "batched (library: LoRA hooks)", "vmap": "batched vmap(jacrev)", "loop": "per-example loop"}


def loop_jacobians(model, encoder, rows, params) -> torch.Tensor:
    """The straightforward way, ``(R, C, P)``: per example, a forward (batch of 1, no padding,
    the model's own attention), then one ``autograd.grad`` per label word."""
    label_ids = label_word_ids(encoder)
    out = []
    for ex in rows:
        batch = encode_rows(encoder, [ex]).to(params[0].device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=1, use_cache=False).logits[0, -1, label_ids]
        out.append(torch.stack([
            torch.cat([g.flatten()
                       for g in torch.autograd.grad(logits[c], params, retain_graph=c + 1 < len(label_ids))])
            for c in range(len(label_ids))]))
    return torch.stack(out)


def batched_jacobians(fn, encoder, rows, params, names, use_vmap: bool = False) -> torch.Tensor:
    """What :func:`ftlab.kernel.compute_kernel` runs per chunk on a padded batch (or, with
    ``use_vmap``, the generic ``vmap(jacrev)`` path it takes for non-LoRA parameters)."""
    batch = encode_rows(encoder, rows).to(next(iter(params.values())).device)
    with torch.no_grad():
        if use_vmap:
            with eager_attention(fn.module):
                jac = vmap_jacobians_and_outputs(fn, params, batch)[0]
        else:
            jac = jacobians_and_outputs(fn, params, batch)[0]
    return torch.cat(flat(jac, names), 1).view(len(rows), fn.readout.shape[1], -1)


def kernels(jac: torch.Tensor, n_train: int) -> dict[str, torch.Tensor]:
    jac = jac.double()
    return {"sgd": torch.einsum("aop,bqp->aboq", jac, jac[:n_train]),
            "sign": torch.einsum("aop,bqp->aboq", jac, torch.sign(jac[:n_train]))}


def project(projector, jac: torch.Tensor, n_train_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``P J`` of a chunk's Jacobians ``(R, O, n)`` and ``P sign(J)`` of its first
    ``n_train_rows`` rows, with the seeded sparse projector (as ``compute_kernel`` does with
    ``projection_dim``)."""
    r, o, n = jac.shape
    d = projector.spec.dim_out
    phi = projector.project(jac.reshape(r * o, n)).view(r, o, d).double()
    if not n_train_rows:  # a chunk of test rows only
        return phi, phi.new_zeros(0, o, d)
    signs = torch.sign(jac[:n_train_rows]).reshape(n_train_rows * o, n)
    return phi, projector.project(signs).view(n_train_rows, o, d).double()


def projected_kernels(phi: torch.Tensor, phi_sign: torch.Tensor) -> dict[str, torch.Tensor]:
    """The kernels from projected Jacobians of every row and signed ones of the training rows."""
    return {"sgd": torch.einsum("aop,bqp->aboq", phi, phi[:len(phi_sign)]),
            "sign": torch.einsum("aop,bqp->aboq", phi, phi_sign)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--max-padding", type=float, default=0.1, help="see KernelSpec.max_padding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--projection-dim", type=int, default=8192)
    ap.add_argument("--output", type=Path, default=RESULTS / "kernel_speed.json")
    ap.add_argument("--vmap", action="store_true", help="also time the generic vmap(jacrev) path")
    ap.add_argument("--refit", type=Path, help="only add the per-row/per-token fit to this results JSON")
    args = ap.parse_args()
    if args.refit:
        result = json.loads(args.refit.read_text())
        result["cost_fit"] = cost_fit(result["per_chunk"])
        result["by_length"] = length_groups(result["per_chunk"])
        write_json(args.refit.absolute(), result)
        print_fit(result["cost_fit"], result["by_length"])
        return
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", device=args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = prepare_model(model, "lora", lora=LoraSettings(r=8, alpha=16)).eval()
    spec, examples = load_task("sentiment")
    splits = make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=args.n_test,
                         k_per_class=args.n_train // 2)
    train, test = splits.train, splits.test
    names = select_parameters(module, "lora")
    n_params = sum(p.numel() for p in names.values())

    # The methods alternate chunk by chunk (same rows), so load from other processes on this
    # shared machine hits all alike. Rows are sorted and chunked by length as compute_kernel does.
    encoder = Encoder(tokenizer, spec)
    fn = OutputFunction(module, label_word_ids(encoder), torch.eye(len(spec.options), dtype=torch.float64))
    plan = plan_rows(encoder, train, test, args.chunk_size, args.max_padding)
    rows, lengths, chunks = plan.rows, plan.lengths, plan.chunks
    trainable = [p for n, p in module.named_parameters() if n in names]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    projector = Projector(ProjectionSpec(dim_in=n_params, dim_out=args.projection_dim, seed=0), args.device)
    methods = {"batched": lambda chunk: batched_jacobians(fn, encoder, chunk, names, list(names)),
               "loop": lambda chunk: loop_jacobians(module, encoder, chunk, trainable)}
    if args.vmap:
        methods["vmap"] = lambda chunk: batched_jacobians(fn, encoder, chunk, names, list(names), use_vmap=True)
    seconds = dict.fromkeys(methods, 0.0)
    jacs: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    projected = []
    per_chunk = []
    for s, e in tqdm(chunks, desc="chunks"):
        chunk = rows[s:e]
        took = {}
        for name, method in methods.items():
            with clock(sync) as c:
                jacs[name].append(method(chunk))
            took[name] = c.seconds
            seconds[name] += took[name]
        per_chunk.append({"rows": e - s, "tokens": sum(lengths[s:e]), "padded_tokens": (e - s) * max(lengths[s:e]),
                          "seconds": took})
        projected.append(project(projector, jacs["batched"][-1], max(0, min(len(chunk), len(train) - s))))
        # Written after every chunk: a run cut short still reports the rows it measured.
        report(args, n_params, len(train), len(test), e, seconds, jacs, projected, per_chunk)


def cost_fit(per_chunk: list[dict]) -> dict[str, dict[str, float]]:
    """Least-squares ``seconds = per_row * rows + per_token * tokens`` over the chunks, per
    method: what batching can remove (per-row overhead) and what it cannot (per-token work)."""
    if len(per_chunk) < 2:
        return {}
    a = torch.tensor([[c["rows"], c["tokens"]] for c in per_chunk], dtype=torch.float64)
    fit = {}
    for m in per_chunk[0]["seconds"]:
        y = torch.tensor([[c["seconds"][m]] for c in per_chunk], dtype=torch.float64)
        per_row, per_token = torch.linalg.lstsq(a, y).solution.flatten().tolist()
        fit[m] = {"per_row_s": per_row, "per_token_ms": 1e3 * per_token}
    return fit


LENGTH_BINS = (15, 25, 40, 80, 10**9)  # upper ends of the groups by mean prompt length of a chunk


def length_groups(per_chunk: list[dict]) -> list[dict]:
    """Rows, tokens and seconds per method, summed over chunks grouped by mean prompt length."""
    groups = []
    low = 0
    for high in LENGTH_BINS:
        chunks = [c for c in per_chunk if low < c["tokens"] / c["rows"] <= high]
        if chunks:
            groups.append({"mean_tokens_above": low, "mean_tokens_up_to": high,
                           "rows": sum(c["rows"] for c in chunks), "tokens": sum(c["tokens"] for c in chunks),
                           "seconds": {m: sum(c["seconds"][m] for c in chunks) for m in chunks[0]["seconds"]}})
        low = high
    return groups


def report(args, n_params: int, n_train: int, n_test: int, done: int, seconds: dict[str, float],
           jacs: dict[str, list[torch.Tensor]], projected: list[tuple[torch.Tensor, torch.Tensor]],
           per_chunk: list[dict]) -> None:
    """Print and save the measurement over the first ``done`` rows (kernels vs the first
    ``min(done, n_train)`` training rows); every method is compared with the loop's kernels."""
    cols = min(done, n_train)
    ks = {m: kernels(torch.cat(j), cols) for m, j in jacs.items()}
    slow = ks["loop"]
    diffs = {m: {k: float((ks[m][k] - slow[k]).abs().max()) for k in slow} for m in ks if m != "loop"}
    scale = {k: float(slow[k].abs().max()) for k in slow}
    fast = ks["batched"]
    proj = projected_kernels(torch.cat([p for p, _ in projected]), torch.cat([q for _, q in projected]))
    proj_err = {k: float((proj[k] - fast[k]).norm() / fast[k].norm()) for k in fast}
    speedup = {m: seconds["loop"] / seconds[m] for m in seconds if m != "loop"}
    result = {
        "model": "smollm2-135m", "task": "sentiment", "params": "LoRA q_proj,v_proj r=8", "n_params": n_params,
        "n_train": n_train, "n_test": n_test, "rows_measured": done, "chunk_size": args.chunk_size,
        "max_padding": args.max_padding, "tokens": sum(c["tokens"] for c in per_chunk),
        "padded_tokens": sum(c["padded_tokens"] for c in per_chunk),
        "threads": args.threads, "device": args.device, "seconds": seconds, "speedup_vs_loop": speedup,
        "max_abs_diff_vs_loop": diffs, "max_abs_value": scale,
        "projection": {"dim": args.projection_dim, "relative_frobenius_error": proj_err},
        "extrapolated_64_500_seconds": {m: t / done * 564 for m, t in seconds.items()},
        "cost_fit": cost_fit(per_chunk),
        "by_length": length_groups(per_chunk),
        "per_chunk": per_chunk,
        "machine": machine(),
    }
    write_json(args.output.absolute(), result)
    print(table([(LABELS[m], f"{t:.1f}", f"{t / done:.3f}", f"{t / done * 564 / 60:.1f}",
                  f"{speedup[m]:.2f}x" if m in speedup else "1x") for m, t in seconds.items()],
                ("method", f"seconds ({done} of {n_train}+{n_test} rows)", "s/row", "min for 64+500 (extrapolated)",
                 "speedup vs loop")))
    for m, d in diffs.items():
        print(f"{LABELS[m]}: max |diff| to the loop's kernels sgd {d['sgd']:.2e} (max |K| {scale['sgd']:.2e}), "
              f"sign {d['sign']:.2e} (max |K| {scale['sign']:.2e})")
    print(f"projected to d={args.projection_dim}: relative error sgd {proj_err['sgd']:.3f}, "
          f"sign {proj_err['sign']:.3f}", flush=True)
    print_fit(result["cost_fit"], result["by_length"])


def print_fit(fit: dict[str, dict[str, float]], groups: list[dict]) -> None:
    """The speedups by prompt length and the per-row/per-token fit."""
    span = lambda g: f"{g['mean_tokens_above'] + 1}" + (  # noqa: E731
        "+" if g["mean_tokens_up_to"] == LENGTH_BINS[-1] else f"-{g['mean_tokens_up_to']}")
    print(table([(span(g), g["rows"], g["tokens"],
                  *(f"{g['seconds'][m]:.1f}" for m in g["seconds"]),
                  *(f"{g['seconds']['loop'] / g['seconds'][m]:.2f}x" for m in g["seconds"] if m != "loop"))
                 for g in groups],
                ("mean tokens per prompt", "rows", "tokens", *(f"{m} s" for m in groups[0]["seconds"]),
                 *(f"{m} speedup" for m in groups[0]["seconds"] if m != "loop"))) if groups else "")
    for m, f in fit.items():
        print(f"{LABELS[m]}: {f['per_row_s']:.3f} s per row + {f['per_token_ms']:.2f} ms per token "
              "(least squares over the chunks)")


if __name__ == "__main__":
    main()
