"""eNTK computation speed on SmolLM2-135M: the batched ``vmap(jacrev)`` Jacobians that
:func:`ftlab.kernel.compute_kernel` computes per chunk against a straightforward loop (one forward per example, one
backward per label word, gradients flattened). The two alternate chunk by chunk on the same rows
(timing the per-example Jacobians, which is where all the time goes), so the load of other
processes on a shared machine hits both alike; the kernels built from both are compared.

Both compute the SGD and sign kernels of the label-word logits w.r.t. the LoRA parameters
(q_proj, v_proj, r=8: 460,800 entries; seeded peft init) for ``--n-train`` training rows and
``--n-test`` test rows of the sentiment task. The cost of both is linear in the number of rows
(one Jacobian per row; the kernel products are negligible), so the time for 64 + 500 rows is
reported as the measured per-row time times 564 (or measured, with ``--n-test 500``).

It also measures the error of the projected kernel on SmolLM2: the batched Jacobians projected
to ``--projection-dim`` with the LESS projector (what ``compute_kernel`` does for large parameter
sets) against the exact kernel, as relative Frobenius errors. Prints a table, writes
``benchmarks/results/kernel_speed.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kernel_speed.py --n-train 64 --n-test 16
    python benchmarks/kernel_speed.py --n-train 64 --n-test 500 --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ftlab.cli.common import table
from ftlab.io import atomic_write_json
from ftlab.kernel import select_parameters
from ftlab.kernel.entk import OutputFunction, by_length, eager_attention, encode_rows, flat, jacobians, label_word_ids
from ftlab.models import LoraSettings, load_model, prepare_model
from ftlab.objectives import Encoder
from ftlab.select.projection import ProjectionSpec, Projector
from ftlab.tasks import load_task, make_splits

RESULTS = Path(__file__).parent / "results" / "kernel_speed.json"


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
            torch.cat([g.flatten() for g in torch.autograd.grad(logits[c], params, retain_graph=c + 1 < len(label_ids))])
            for c in range(len(label_ids))]))
    return torch.stack(out)


def batched_jacobians(fn, encoder, rows, params, names) -> torch.Tensor:
    """What :func:`ftlab.kernel.compute_kernel` runs per chunk: ``vmap(jacrev)`` on a padded batch."""
    with torch.no_grad(), eager_attention(fn.module):
        jac = jacobians(fn, params, encode_rows(encoder, rows).to(next(iter(params.values())).device))
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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--projection-dim", type=int, default=8192)
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
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

    # The two methods alternate chunk by chunk (same rows), so load from other processes on this
    # shared machine hits both alike. Rows are sorted by length as compute_kernel sorts them.
    encoder = Encoder(tokenizer, spec)
    fn = OutputFunction(module, label_word_ids(encoder), torch.eye(len(spec.options), dtype=torch.float64))
    rows = [train[i] for i in by_length(spec, train)] + [test[i] for i in by_length(spec, test)]
    trainable = [p for n, p in module.named_parameters() if n in names]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    projector = Projector(ProjectionSpec(dim_in=n_params, dim_out=args.projection_dim, seed=0), args.device)
    batched_s = loop_s = 0.0
    batched, looped, projected = [], [], []
    for s in tqdm(range(0, len(rows), args.chunk_size), desc="chunks"):
        chunk = rows[s:s + args.chunk_size]
        t = time.perf_counter()
        batched.append(batched_jacobians(fn, encoder, chunk, names, list(names)))
        sync()
        batched_s += time.perf_counter() - t
        t = time.perf_counter()
        looped.append(loop_jacobians(module, encoder, chunk, trainable))
        sync()
        loop_s += time.perf_counter() - t
        projected.append(project(projector, batched[-1], max(0, min(len(chunk), len(train) - s))))
        # Written after every chunk: a run cut short still reports the rows it measured.
        report(args, n_params, len(train), len(test), s + len(chunk), batched_s, loop_s, batched, looped, projected)


def report(args, n_params: int, n_train: int, n_test: int, done: int, batched_s: float, loop_s: float,
           batched: list[torch.Tensor], looped: list[torch.Tensor],
           projected: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Print and save the measurement over the first ``done`` rows (kernels vs the first
    ``min(done, n_train)`` training rows)."""
    cols = min(done, n_train)
    fast, slow = kernels(torch.cat(batched), cols), kernels(torch.cat(looped), cols)
    diffs = {k: float((fast[k] - slow[k]).abs().max()) for k in fast}
    scale = {k: float(slow[k].abs().max()) for k in slow}
    proj = projected_kernels(torch.cat([p for p, _ in projected]), torch.cat([q for _, q in projected]))
    proj_err = {k: float((proj[k] - fast[k]).norm() / fast[k].norm()) for k in fast}
    result = {
        "model": "smollm2-135m", "task": "sentiment", "params": "LoRA q_proj,v_proj r=8", "n_params": n_params,
        "n_train": n_train, "n_test": n_test, "rows_measured": done, "chunk_size": args.chunk_size,
        "threads": args.threads, "device": args.device, "batched_seconds": batched_s, "loop_seconds": loop_s, "speedup": loop_s / batched_s,
        "max_abs_diff": diffs, "max_abs_value": scale,
        "projection": {"dim": args.projection_dim, "relative_frobenius_error": proj_err},
        "extrapolated_64_500_seconds": {"batched": batched_s / done * 564, "loop": loop_s / done * 564},
    }
    atomic_write_json(args.output, result)
    print(table([("batched vmap(jacrev)", f"{batched_s:.1f}", f"{batched_s / done:.2f}", f"{batched_s / done * 564 / 60:.1f}"),
                 ("per-example loop", f"{loop_s:.1f}", f"{loop_s / done:.2f}", f"{loop_s / done * 564 / 60:.1f}")],
                ("method", f"seconds ({done} of {n_train}+{n_test} rows)", "s/row", "min for 64+500 (extrapolated)")))
    print(f"speedup {loop_s / batched_s:.2f}x; max |diff| sgd {diffs['sgd']:.2e} (max |K| {scale['sgd']:.2e}), "
          f"sign {diffs['sign']:.2e} (max |K| {scale['sign']:.2e}); projected to d={args.projection_dim}: "
          f"relative error sgd {proj_err['sgd']:.3f}, sign {proj_err['sign']:.3f}", flush=True)


if __name__ == "__main__":
    main()
