"""Kernel-regime diagnostics: the jvp linearisation against explicit Jacobians, its error
scaling, the report, and an end-to-end run with the repo's training loop on a tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from ftlab.config import TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.kernel import KernelSpec, readout_matrix, select_parameters
from ftlab.kernel.diagnostics import (
    RegimeReport,
    agreement,
    diagnose,
    kernel_change,
    kernel_kind_for,
    linearisation_error,
    linearised_outputs,
)
from ftlab.kernel.outputs import OutputFunction, label_word_ids
from ftlab.objectives import Encoder
from ftlab.tasks import Splits, TaskSpec
from ftlab.tasks.base import Example

from kernel_helpers import SPEC, examples, explicit_jacobians


def _perturbed(params, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: p + scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


def test_jvp_linearisation_equals_explicit_jacobian_times_delta(gpt2_64, tiny_tokenizer):
    names = select_parameters(gpt2_64, r"re:h\.1\.attn")
    encoder = Encoder(tiny_tokenizer, SPEC)
    readout = readout_matrix(3, "logits")
    fn = OutputFunction(gpt2_64, label_word_ids(encoder), readout)
    start = dict(names)
    end = _perturbed(start, 1e-2)
    exs = examples()
    f0, f_lin, f_end = linearised_outputs(fn, start, end, exs, encoder, chunk_size=3)
    jac = explicit_jacobians(gpt2_64, tiny_tokenizer, SPEC, exs, names, readout)
    delta = torch.cat([(end[n] - start[n]).flatten() for n in names])
    torch.testing.assert_close(f_lin - f0, jac @ delta, rtol=1e-9, atol=1e-9)
    # The model itself at `end`: f_end differs from the linearisation only at second order.
    errors = [linearisation_error(*linearised_outputs(fn, start, _perturbed(start, s), exs, encoder))
              for s in (1e-2, 1e-3)]
    assert 5 < errors[0] / errors[1] < 20  # O(|delta|): ten times smaller step, ~ten times smaller error


def test_report_metrics_and_verdict():
    k = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert kernel_change(k, k) == 0
    assert kernel_change(k, 2 * k) == pytest.approx(1.0)
    assert agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    with pytest.raises(FtlabError, match="cannot compare"):
        agreement([0], [0, 1])
    f0 = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(FtlabError, match="did not change"):
        linearisation_error(f0, f0, f0)
    assert kernel_kind_for("adamw") == "sign" and kernel_kind_for("sgd") == "sgd"
    inside = RegimeReport("sgd", "lora", "sgd", 0.82, 0.1, kernel_accuracy=0.8, agreement=0.9, kernel_change=0.05)
    outside = RegimeReport("adamw", "full", "sign", 0.9, 0.8, kernel_accuracy=0.6, agreement=0.6, kernel_change=0.05)
    unknown = RegimeReport("adamw", "full", "sign", 0.9, linearisation_error=0.2)
    assert unknown.in_kernel_regime is None and "no verdict (kernel not computed)" in unknown.verdict()
    assert inside.in_kernel_regime and "in the kernel regime (linearisation error 0.100 <= 0.3" in inside.verdict()
    assert not outside.in_kernel_regime and "NOT in the kernel regime" in outside.verdict()
    assert "0.800 > 0.3" in outside.verdict() and outside.to_dict()["in_kernel_regime"] is False


def _cue_examples(n, seed):
    rng = random.Random(seed)
    filler = ["the", "movie", "story", "was", "a", "film", "and", "acting", "plot"]
    out = []
    for i in range(n):
        words = rng.sample(filler, 3) + [["terrible", "great"][i % 2]]
        rng.shuffle(words)
        out.append(Example(id=f"c:{seed}:{i}", fields={"text": " ".join(words)}, label=i % 2))
    return out


def test_diagnose_end_to_end_with_training_loop(tmp_path, tiny_model_factory, tiny_tokenizer):
    spec = TaskSpec(name="cue", template="{text} It was", options=[" terrible", " great"])
    splits = Splits(train=_cue_examples(8, 1), dev=_cue_examples(4, 2), test=_cue_examples(8, 3))
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'run'}", "mode=lora", "optimizer=sgd", "lr=1e-2",
                                          "steps=4", "batch_size=4", "eval_every=0", "eval_batch_size=8",
                                          "lora.r=2", "max_grad_norm=null"])
    load = lambda: (tiny_model_factory("llama").double(), tiny_tokenizer)  # noqa: E731
    report, details = diagnose(cfg, spec, splits, tmp_path / "kernels", kspec=KernelSpec(params="trainable"),
                               load=load)
    assert report.kernel_kind == "sgd" and report.optimizer == "sgd" and report.mode == "lora"
    assert 0 <= report.kernel_accuracy <= 1 and 0 <= report.agreement <= 1
    assert report.finetuned_accuracy == details["run"]["test"]["accuracy"]
    # A few small SGD steps from LoRA's B = 0: close to linear, the kernel barely moves.
    assert 0 < report.linearisation_error < 0.3
    assert 0 < report.kernel_change < 0.3
    assert report.in_kernel_regime and report.verdict().startswith("lora/sgd: in the kernel regime")
    assert (tmp_path / "kernels" / "start" / "kernel.safetensors").exists()
    assert (tmp_path / "kernels" / "end-sgd" / "kernel.safetensors").exists()
    assert details["kernel_predictions"] != [] and len(details["finetuned_predictions"]) == 8
