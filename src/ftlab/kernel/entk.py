"""Empirical NTK of prompt-based classification (Malladi et al., 2023).

The network output of an example is ``f(x) = R^T z(x)``, where ``z(x)`` are the logits of the
``C`` label words at the prompt's last position and ``R`` (``C x O``) the *readout*:

- ``output="logits"``: ``R = I``, ``f`` is the ``C`` label-word logits (the paper's multi-class
  setting);
- ``output="contrast"``: ``R`` is an orthonormal basis of the sum-zero vectors, so ``f`` holds
  the ``C - 1`` logit contrasts a softmax over the label words depends on (for two classes the
  logit difference / sqrt(2), the paper's binary setting).

For a parameter subset ``theta`` (all, LoRA, or a name pattern) two kernels are computed as
``O x O`` blocks per pair of examples:

- SGD: ``K(x, x') = J(x) J(x')^T``, ``J(x) = df(x)/dtheta`` (``O x P``);
- sign (Adam): ``K(x, x') = J(x) sign(J(x'))^T`` with ``x'`` a training example (asymmetric).

Rows are the training examples followed by the test examples, columns the training examples.
Per-example Jacobians come, per chunk of examples, from one batched forward and one backward per
output for LoRA weights (:mod:`ftlab.grads.lora`), and from
``vmap(jacrev(functional_call))`` for any other parameters.
*Exact* kernels walk the parameters in blocks (the training Jacobian of one block is held in
memory) and save the partial sums after each block's training part and each test chunk;
*projected* kernels map each example's
Jacobian rows with a seeded :class:`ftlab.grads.projection.Projector` and save the features
after each chunk of examples. Either way a killed computation resumes where it stopped, and the
finished kernel is one safetensors file beside a JSON manifest (see :mod:`ftlab.kernel.store`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ftlab.errors import FtlabError
from ftlab.kernel.chunks import plan_rows
from ftlab.kernel.jacobians import flat, jacobians_and_outputs, parameter_blocks
from ftlab.kernel.outputs import OUTPUTS, OutputFunction, encode_rows, label_word_ids, readout_matrix, select_parameters
from ftlab.kernel.store import KernelData, KernelStore
from ftlab.objectives import Encoder
from ftlab.runs import writes_run_dir
from ftlab.tasks.base import Example, TaskSpec

KINDS = ("sgd", "sign")


@dataclass
class KernelSpec:
    """What kernel to compute and how.

    Attributes:
        params: ``"all"``, ``"trainable"`` (parameters with ``requires_grad``), ``"lora"`` (the
            LoRA matrices of a peft model) or ``"re:<regex>"`` (names matching it, e.g.
            ``"re:layers\\.29\\."``).
        output: ``"logits"`` or ``"contrast"`` (see the module docstring).
        projection_dim: ``None`` for the exact kernel, else the dimension of the random projection.
        projection_seed, projection_kind: the projection (:class:`ProjectionSpec`).
        chunk_size: at most this many examples per batched pass (memory: ``chunk_size x O``
            Jacobians); examples go in order of prompt length.
        max_padding: a chunk is cut short where padding it to its longest prompt would add more
            than this share of its real tokens (:func:`ftlab.kernel.chunks.length_chunks`).
        max_block_mb: exact kernels: memory for one parameter block's training Jacobian.
        max_length: prompts are cut from the left to this many tokens.
    """

    params: str = "lora"
    output: str = "logits"
    projection_dim: int | None = None
    projection_seed: int = 0
    projection_kind: str = "sparse"
    chunk_size: int = 8
    max_padding: float = 0.1
    max_block_mb: float = 1024.0
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise FtlabError(f"kernel output must be one of {OUTPUTS}, got {self.output!r}")
        if self.chunk_size < 1:
            raise FtlabError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.max_padding >= 0:
            raise FtlabError(f"max_padding must be >= 0 (a share of a chunk's tokens), got {self.max_padding}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise FtlabError(f"projection_dim must be >= 1 (or unset for the exact kernel), got {self.projection_dim}")


@writes_run_dir("kernel", "out_dir")  # claims + locks the kernel folder
def compute_kernel(module: nn.Module, tokenizer: Any, spec: TaskSpec, train: Sequence[Example],
                   test: Sequence[Example], kspec: KernelSpec, out_dir: str | Path, *,
                   identity: dict[str, Any] | None = None, progress: bool = True) -> KernelData:
    """Compute (or resume, or load) the SGD and sign kernels of ``module`` on ``train``/``test``.

    Args:
        module: the model (a peft model for ``params="lora"``), in eval mode.
        tokenizer, spec: how examples become prompts; label words must be single tokens.
        train, test: the examples; rows of the kernel are ``train + test``, columns ``train``.
        kspec: parameters, output, exact or projected, chunking.
        out_dir: the kernel folder (manifest, partial state, finished ``kernel.safetensors``).
        identity: what the kernel belongs to (model name, task, split seeds...), stored in the
            manifest; a folder written for another identity is refused.

    Raises:
        FtlabError: multi-token label words, empty splits, a folder holding another kernel,
            parameter blocks that cannot fit the memory budget.
    """
    if not train:
        raise FtlabError("the kernel needs at least one training example")
    encoder = Encoder(tokenizer, spec, max_length=kspec.max_length)
    label_ids = label_word_ids(encoder)
    device = next(module.parameters()).device
    params = select_parameters(module, kspec.params)
    readout = readout_matrix(len(label_ids), kspec.output)
    fn = OutputFunction(module, label_ids, readout)
    manifest = {
        "identity": dict(identity or {}), "task": spec.name, "template": spec.template,
        "options": list(spec.options), "train_ids": [ex.id for ex in train], "test_ids": [ex.id for ex in test],
        "train_labels": [ex.label for ex in train], "test_labels": [ex.label for ex in test],
        "spec": dataclasses.asdict(kspec), "param_names": list(params),
        "n_params": sum(p.numel() for p in params.values()), "readout": readout.tolist(),
    }
    store = KernelStore(out_dir, manifest)
    if store.complete():
        return store.load()
    module.eval()
    # The kernel is put back in the caller's order at the end.
    plan = plan_rows(encoder, train, test, kspec.chunk_size, kspec.max_padding)
    run = _projected if kspec.projection_dim is not None else _exact
    # torch.func transforms still differentiate under no_grad, and the LoRA path enables grad
    # for its own pass; nothing else builds a graph.
    with torch.no_grad():
        sgd, sign, f0 = run(fn, encoder, params, plan.rows, plan.chunks, len(train), kspec, store, device, progress)
    back_rows = torch.argsort(torch.tensor(plan.train_order + [len(train) + i for i in plan.test_order],
                                           dtype=torch.long))
    back_cols = torch.argsort(torch.tensor(plan.train_order, dtype=torch.long))

    def unsort(k: Tensor) -> Tensor:  # rows and columns back in the callers' order
        return k[back_rows][:, back_cols]

    return store.finish({"sgd": unsort(sgd), "sign": unsort(sign), "f0": f0[back_rows], "readout": readout})


def _exact(fn: OutputFunction, encoder: Encoder, params: dict[str, Tensor], rows: list[Example],
           chunks: list[tuple[int, int]], n_train: int, kspec: KernelSpec, store: KernelStore,
           device: torch.device, progress: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Exact kernels, summed over parameter blocks, and the outputs ``f0`` (from the first block's passes).

    Per block: the training Jacobian ``(N, O, n_block)`` is built chunk by chunk and kept (its
    train x train part added), then every test chunk's Jacobian is multiplied against it and
    dropped. The partial sums are saved after the training part and after each test chunk
    (``done`` counts these steps over all blocks); a resumed block recomputes only its training
    Jacobian, without adding it twice.
    """
    n_out = fn.readout.shape[1]
    blocks = parameter_blocks(params, n_train * n_out, kspec.max_block_mb)
    shape = (len(rows), n_train, n_out, n_out)
    state = store.partial({"sgd": torch.zeros(shape, dtype=torch.float64),
                           "sign": torch.zeros(shape, dtype=torch.float64),
                           "f0": torch.zeros(len(rows), n_out, dtype=torch.float64)}, unit="step")
    train_chunks = [c for c in chunks if c[1] <= n_train]
    test_chunks = [c for c in chunks if c[0] >= n_train]
    steps = 1 + len(test_chunks)  # per block: the training part, then one step per test chunk
    bar = tqdm(total=len(blocks) * steps, initial=state.done, disable=not progress, desc="eNTK (exact)",
               unit="step")

    def block_jacobian(names: list[str], s: int, e: int) -> Tensor:
        block = {n: params[n] for n in names}
        jac, f = jacobians_and_outputs(fn, block, encode_rows(encoder, rows[s:e]).to(device))
        state.tensors["f0"][s:e] = f.double().cpu()  # the same in every block
        return torch.cat(flat(jac, names), 1).view(e - s, n_out, -1)

    for b in range(state.done // steps, len(blocks)):
        first = state.done - b * steps  # steps of this block already saved (0 unless resuming it)
        train_j = torch.cat([block_jacobian(blocks[b], s, e) for s, e in train_chunks])
        train_sign = torch.sign(train_j)
        if first == 0:
            _accumulate(state.tensors, 0, train_j, train_j, train_sign)
            state.save(b * steps + 1)
            bar.update(1)
        for t in range(max(first, 1) - 1, len(test_chunks)):
            s, e = test_chunks[t]
            _accumulate(state.tensors, s, block_jacobian(blocks[b], s, e), train_j, train_sign)
            state.save(b * steps + 2 + t)
            bar.update(1)
    bar.close()
    return state.tensors["sgd"], state.tensors["sign"], state.tensors["f0"]


def _accumulate(acc: dict[str, Tensor], start: int, j: Tensor, train_j: Tensor, train_sign: Tensor) -> None:
    """Add one parameter block's contribution of rows ``start .. start + len(j)`` to both kernels."""
    acc["sgd"][start:start + len(j)] += torch.einsum("aop,bqp->aboq", j, train_j).double().cpu()
    acc["sign"][start:start + len(j)] += torch.einsum("aop,bqp->aboq", j, train_sign).double().cpu()


def _projected(fn: OutputFunction, encoder: Encoder, params: dict[str, Tensor], rows: list[Example],
               chunks: list[tuple[int, int]], n_train: int, kspec: KernelSpec, store: KernelStore,
               device: torch.device, progress: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Kernels of projected Jacobians ``P J`` and ``P sign(J)``, and ``f0``; features saved per chunk."""
    from ftlab.grads.projection import ProjectionSpec, Projector

    n_out, names = fn.readout.shape[1], list(params)
    pspec = ProjectionSpec(dim_in=sum(p.numel() for p in params.values()), dim_out=kspec.projection_dim,
                           seed=kspec.projection_seed, kind=kspec.projection_kind)
    projector = Projector(pspec, device)
    d = pspec.dim_out
    state = store.partial({"phi": torch.zeros(len(rows), n_out, d),
                           "phi_sign": torch.zeros(n_train, n_out, d),
                           "f0": torch.zeros(len(rows), n_out, dtype=torch.float64)}, unit="chunk")
    for c in tqdm(range(state.done, len(chunks)), initial=state.done, total=len(chunks),
                  disable=not progress, desc="eNTK (projected)", unit="chunk"):
        s, e = chunks[c]
        jac, f = jacobians_and_outputs(fn, params, encode_rows(encoder, rows[s:e]).to(device))
        state.tensors["f0"][s:e] = f.double().cpu()
        blocks = flat(jac, names)
        state.tensors["phi"][s:e] = projector.project_blocks(blocks).view(e - s, n_out, d).cpu()
        t = max(0, min(e, n_train) - s)  # rows of this chunk that are training examples
        if t:
            signs = [torch.sign(b.view(e - s, n_out, -1)[:t].reshape(t * n_out, -1)) for b in blocks]
            state.tensors["phi_sign"][s:s + t] = projector.project_blocks(signs).view(t, n_out, d).cpu()
        state.save(c + 1)
    phi = state.tensors["phi"].double()
    sgd = torch.einsum("aop,bqp->aboq", phi, phi[:n_train])
    sign = torch.einsum("aop,bqp->aboq", phi, state.tensors["phi_sign"].double())
    return sgd, sign, state.tensors["f0"]


def projection_error(exact: KernelData, projected: KernelData) -> dict[str, float]:
    """Relative Frobenius error ``||K_proj - K_exact|| / ||K_exact||`` of both kernels."""
    return {kind: float((projected.tensors[kind] - exact.tensors[kind]).norm() / exact.tensors[kind].norm())
            for kind in KINDS}
