"""`ftlab kernel` commands (CliRunner on the sub-app) and the kernel plots."""

from __future__ import annotations

import json

import pytest
import torch
from kernel_helpers import SPEC, examples
from typer.testing import CliRunner

from ftlab.cli.kernel import app
from ftlab.errors import FtlabError
from ftlab.kernel import KernelSpec, compute_kernel, load_kernel
from ftlab.kernel.plots import accuracy_scatter, kernel_heatmap
from ftlab.kernel.solvers import solve


@pytest.fixture
def kernel_dir(gpt2_64, tiny_tokenizer, tmp_path):
    exs = examples()
    compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs[:6], exs[6:], KernelSpec(params=r"re:h\.1\.mlp\.c_proj"),
                   tmp_path / "k", identity={"model": "tiny", "k": 2, "seed": 0}, progress=False)
    return tmp_path / "k"


def test_solve_prints_table_and_writes_predictions(kernel_dir, tmp_path):
    out = tmp_path / "pred.json"
    result = CliRunner().invoke(app, ["solve", str(kernel_dir), "--predictions", str(out),
                                      "--heatmap", str(tmp_path / "heat.png"), "--model", "tiny", "--task", "toy"])
    assert result.exit_code == 0, result.output
    assert "zero-shot (f0)" in result.output and "regression" in result.output and "logistic" in result.output
    saved = json.loads(out.read_text())
    assert len(saved["solutions"]) == 6  # 3 methods x 2 kernels
    reg = next(s for s in saved["solutions"] if s["method"] == "regression" and s["kind"] == "sgd")
    assert reg["predictions"] == solve(load_kernel(kernel_dir), "regression", "sgd").predictions
    assert (tmp_path / "heat.png").stat().st_size > 1000


def test_solve_refuses_kernel_of_another_model(kernel_dir):
    result = CliRunner().invoke(app, ["solve", str(kernel_dir), "--model", "smollm2-135m"])
    assert result.exit_code != 0
    assert isinstance(result.exception, FtlabError) and "model='tiny', not 'smollm2-135m'" in str(result.exception)


def test_accuracy_scatter(tmp_path):
    records = [{"task": t, "label": lab, "kernel_accuracy": 0.6 + 0.1 * i, "finetuned_accuracy": 0.7}
               for i, (t, lab) in enumerate([("sentiment", "lora/sgd"), ("nli", "lora/adamw")])]
    png = accuracy_scatter(records, tmp_path / "s.png")
    assert png.stat().st_size > 1000
    with pytest.raises(FtlabError, match="nothing to plot"):
        accuracy_scatter([], tmp_path / "e.png")


def test_heatmap_of_real_kernel_rows(kernel_dir, tmp_path):
    kd = load_kernel(kernel_dir)
    assert kernel_heatmap(kd, tmp_path / "h.png", kind="sign").stat().st_size > 1000
    assert torch.isfinite(kd.tensors["sign"]).all()


@pytest.mark.slow
def test_compute_and_solve_on_smollm2(tmp_path, bigbench):
    """The real model end to end through the CLI on a tiny split (final-norm parameters: fast)."""
    out = tmp_path / "k"
    args = ["compute", "--out", str(out), "--k", "1", "--n-test", "2", "--params", r"re:^model\.norm\."]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    kd = load_kernel(out, {"identity": {"model": "smollm2-135m", "k": 1}, "task": "sentiment"})
    assert kd.tensors["sgd"].shape == (4, 2, 2, 2) and kd.manifest["n_params"] == 576
    assert CliRunner().invoke(app, args).exit_code == 0  # a rerun loads the finished kernel
    result = CliRunner().invoke(app, ["solve", str(out), "--method", "regression"])
    assert result.exit_code == 0 and "regression" in result.output
