"""Is fine-tuning in the kernel regime? Fine-tune for real with :func:`ftlab.train.train` on the
same k-shot split as the kernel, then compare (Malladi et al., 2023, Sec. 6):

(a) accuracy of the kernel solution vs the fine-tuned model (its weights at the last step) on the test examples;
(b) agreement of their per-example predictions;
(c) linearisation error ``||f_ft - f_lin|| / ||f_ft - f0||`` over the test outputs, where
    ``f_lin = f0 + J (theta_ft - theta_0)`` is computed exactly with forward-mode AD
    (``torch.func.jvp``, eager attention);
(d) kernel change ``||K_end - K_start||_F / ||K_start||_F`` of the train x train kernel between
    the start and the end of fine-tuning.

Verdict: "in the kernel regime" when (c) <= ``max_linearisation`` **and** (d) <=
``max_kernel_change`` (both 0.3 by default): the two properties (linearisation, fixed features)
that make fine-tuning equal kernel regression. (a) and (b) are its consequence and are reported,
not used to decide. The kernel is taken over the trained parameters (``params="trainable"``), with
the sign kernel for Adam(W) and the SGD kernel for SGD.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import jvp

from ftlab.config import TrainConfig
from ftlab.errors import FtlabError
from ftlab.evaluate import evaluate
from ftlab.kernel.entk import KernelSpec, compute_kernel
from ftlab.kernel.outputs import (
    OutputFunction,
    eager_attention,
    encode_rows,
    label_word_ids,
    readout_accuracy,
    readout_matrix,
)
from ftlab.kernel.solvers import Solution, solve
from ftlab.models import load_model, trainable_parameters
from ftlab.objectives import Encoder
from ftlab.rundir import RunDir
from ftlab.tasks import Splits, TaskSpec
from ftlab.tasks.base import Example

MAX_LINEARISATION = 0.3
MAX_KERNEL_CHANGE = 0.3


@dataclass
class RegimeReport:
    """The four diagnostics of one fine-tuning run and the verdict they give."""

    optimizer: str
    mode: str
    kernel_kind: str
    finetuned_accuracy: float
    linearisation_error: float
    kernel_accuracy: float | None = None  # None: no kernel computed
    agreement: float | None = None
    kernel_change: float | None = None
    max_linearisation: float = MAX_LINEARISATION
    max_kernel_change: float = MAX_KERNEL_CHANGE

    @property
    def in_kernel_regime(self) -> bool | None:
        """Both thresholds met; ``None`` when the kernel change was not measured."""
        if self.kernel_change is None:
            return None
        return (self.linearisation_error <= self.max_linearisation
                and self.kernel_change <= self.max_kernel_change)

    def verdict(self) -> str:
        """One line: the verdict and the numbers that decide it."""
        lin = (f"linearisation error {self.linearisation_error:.3f} "
               f"{'<=' if self.linearisation_error <= self.max_linearisation else '>'} {self.max_linearisation}")
        if self.kernel_change is None:
            return (f"{self.mode}/{self.optimizer}: no verdict (kernel not computed); {lin}; "
                    f"fine-tuned acc {self.finetuned_accuracy:.3f}")
        regime = "in the kernel regime" if self.in_kernel_regime else "NOT in the kernel regime"
        return (f"{self.mode}/{self.optimizer}: {regime} ({lin}, kernel change {self.kernel_change:.3f} "
                f"{'<=' if self.kernel_change <= self.max_kernel_change else '>'} {self.max_kernel_change}; "
                f"kernel acc {self.kernel_accuracy:.3f} vs fine-tuned {self.finetuned_accuracy:.3f}, "
                f"agreement {self.agreement:.3f})")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "in_kernel_regime": self.in_kernel_regime, "verdict": self.verdict()}


def linearised_outputs(fn: OutputFunction, start: dict[str, Tensor], end: dict[str, Tensor],
                       examples: Sequence[Example], encoder: Encoder, chunk_size: int = 16,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(f0, f_lin, f_end)`` ``(N, O)`` float64: outputs at ``start``, their first-order Taylor
    expansion ``f0 + J (end - start)`` (one jvp per chunk), and the outputs at ``end``."""
    if set(start) != set(end):
        raise FtlabError("start and end weights hold different tensors; were they saved by the same run?")
    delta = {n: (end[n].to(start[n]) - start[n]) for n in start}
    device = next(iter(start.values())).device
    f0s, lins, ends = [], [], []
    with eager_attention(fn.module):
        for s in range(0, len(examples), chunk_size):
            batch = encode_rows(encoder, examples[s:s + chunk_size]).to(device)
            f0, df = jvp(lambda p: fn.batch(p, batch), (start,), (delta,))  # noqa: B023 (called within the iteration)
            with torch.no_grad():
                f_end = fn.batch({n: t.to(start[n]) for n, t in end.items()}, batch)
            f0s.append(f0.detach().double().cpu())
            lins.append((f0 + df).detach().double().cpu())
            ends.append(f_end.double().cpu())
    return torch.cat(f0s), torch.cat(lins), torch.cat(ends)


def linearisation_error(f0: Tensor, f_lin: Tensor, f_end: Tensor) -> float:
    """``||f_end - f_lin||_F / ||f_end - f0||_F`` (0: exactly linear; 1: no better than ``f0``)."""
    moved = (f_end - f0).norm()
    if moved == 0:
        raise FtlabError("the fine-tuned outputs equal the initial ones; the run did not change the model")
    return float((f_end - f_lin).norm() / moved)


def kernel_change(k_start: Tensor, k_end: Tensor) -> float:
    """``||K_end - K_start||_F / ||K_start||_F``."""
    return float((k_end.double() - k_start.double()).norm() / k_start.double().norm())


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of examples on which two prediction lists agree."""
    if len(a) != len(b) or not a:
        raise FtlabError(f"cannot compare {len(a)} with {len(b)} predictions")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def kernel_kind_for(optimizer: str) -> str:
    """The kernel that models an optimizer: sign for Adam(W), SGD otherwise."""
    return "sign" if optimizer.startswith("adam") else "sgd"


def diagnose(cfg: TrainConfig, spec: TaskSpec, splits: Splits, kernel_dir: str | Path | None, *,
             kspec: KernelSpec | None = None, method: str = "regression", ridge: float = 0.0,
             identity: dict[str, Any] | None = None, progress: bool = False,
             load: Callable[[], tuple[nn.Module, Any]] | None = None) -> tuple[RegimeReport, dict[str, Any]]:
    """Fine-tune as ``cfg`` says on ``splits`` and measure (a)-(d) against the kernel of the
    start weights.

    Kernels go to ``kernel_dir/start`` (shared by runs of the same mode and seed) and
    ``kernel_dir/end-<optimizer>``; both are resumable, as is the run in ``cfg.output_dir``.
    ``kernel_dir=None`` skips the kernels (for parameter sets too large to afford): only (c) and
    the fine-tuned accuracy are measured and the report has no verdict. ``load()`` returns a
    fresh (model, tokenizer) (default: load ``cfg.model``); it is called twice, for the start
    weights and for training. Returns the report and the details (solver note and ridge, run
    results, zero-shot accuracy, per-example predictions)."""
    from ftlab.train import RunData, build_trainer, train

    kspec = kspec or KernelSpec(params="trainable")
    kind = kernel_kind_for(cfg.optimizer)
    load = load or (lambda: load_model(cfg.model, dtype=cfg.dtype, device=cfg.device))
    model, tokenizer = load()
    module = build_trainer(cfg, model)[0].eval()  # the exact start weights of the run (seeded adapters)
    ident = {"model": cfg.model, "mode": cfg.mode, "seed": cfg.seed, **(identity or {})}
    start_kernel = None if kernel_dir is None else compute_kernel(
        module, tokenizer, spec, splits.train, splits.test, kspec, Path(kernel_dir) / "start", identity=ident,
        progress=progress)
    ft_model, _ = load()
    results = train(cfg, progress=progress, model_and_tokenizer=(ft_model, tokenizer), data=RunData(spec, splits))
    del ft_model
    start = {n: p.detach().clone() for n, p in trainable_parameters(module)}
    # The end of fine-tuning (its last checkpoint), not its dev-selected best.
    end = RunDir(cfg.output_dir).final_weights("last", fallback=True)
    encoder = Encoder(tokenizer, spec, max_length=kspec.max_length)
    fn = OutputFunction(module, label_word_ids(encoder), readout_matrix(len(spec.options), kspec.output))
    f0, f_lin, f_end = linearised_outputs(fn, start, end, splits.test, encoder)
    with torch.no_grad():
        for n, p in trainable_parameters(module):
            p.copy_(end[n])
    ft_pred = evaluate(module, tokenizer, spec, splits.test, progress=False).predictions
    labels = torch.tensor([ex.label for ex in splits.test])
    details: dict[str, Any] = {
        "run": results, "finetuned_predictions": ft_pred,
        "zero_shot_accuracy": readout_accuracy(f0, fn.readout, labels)}
    report = RegimeReport(optimizer=cfg.optimizer, mode=cfg.mode, kernel_kind=kind,
                          finetuned_accuracy=float((torch.tensor(ft_pred) == labels).double().mean()),
                          linearisation_error=linearisation_error(f0, f_lin, f_end))
    if start_kernel is not None:
        solution: Solution = solve(start_kernel, method, kind, ridge=ridge)
        end_kernel = compute_kernel(module, tokenizer, spec, splits.train, [], kspec,
                                    Path(kernel_dir) / f"end-{cfg.optimizer}",
                                    identity={**ident, "weights": f"end of {cfg.output_dir}"}, progress=progress)
        report.kernel_accuracy = float(solution.accuracy)
        report.agreement = agreement(solution.predictions, ft_pred)
        report.kernel_change = kernel_change(start_kernel.train(kind), end_kernel.train(kind))
        details.update(solution_note=solution.note, ridge=solution.ridge, kernel_predictions=solution.predictions)
    return report, details
