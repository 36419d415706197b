"""`ftlab kernel` commands (CliRunner on the sub-app) and the kernel plots."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ftlab.cli.kernel import app
from ftlab.errors import FtlabError
from ftlab.kernel import KernelSpec, compute_kernel, load_kernel
from ftlab.kernel.plots import accuracy_scatter, kernel_heatmap
from ftlab.kernel.solvers import solve

from kernel_helpers import SPEC, examples


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
               for i, (t, lab) in enumerate([("sentiment", "lora/sgd"), ("trec", "lora/adamw")])]
    png = accuracy_scatter(records, tmp_path / "s.png")
    assert png.stat().st_size > 1000
    with pytest.raises(FtlabError, match="nothing to plot"):
        accuracy_scatter([], tmp_path / "e.png")


def test_heatmap_of_real_kernel_rows(kernel_dir, tmp_path):
    kd = load_kernel(kernel_dir)
    assert kernel_heatmap(kd, tmp_path / "h.png", kind="sign").stat().st_size > 1000
    assert torch.isfinite(kd.tensors["sign"]).all()


@pytest.mark.slow
def test_compute_and_solve_on_smollm2(tmp_path):
    """The real model end to end through the CLI on a tiny split (final-norm parameters: fast)."""
    out = tmp_path / "k"
    args = ["compute", f"output_dir={out}", "k=1", "n_test=2", r"kernel.params=re:^model\.norm\."]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    kd = load_kernel(out, {"identity": {"model": "smollm2-135m", "k": 1}, "task": "sentiment"})
    assert kd.tensors["sgd"].shape == (4, 2, 2, 2) and kd.manifest["n_params"] == 576
    assert CliRunner().invoke(app, args).exit_code == 0  # a rerun loads the finished kernel
    result = CliRunner().invoke(app, ["solve", str(out), "--method", "regression"])
    assert result.exit_code == 0 and "regression" in result.output


def test_kernel_config_builds_the_train_config_the_override_strings_did():
    """KernelConfig.train_config() is the TrainConfig the CLI used to assemble from 11 override strings."""
    from ftlab.config import TrainConfig, load_config
    from ftlab.kernel.config import KernelConfig

    cfg = load_config(KernelConfig, None, ["k=4", "seed=3", "n_test=50", "data_seed=2", "lora_r=4",
                                           "compare.optimizer=adamw", "compare.steps=7", "output_dir=o"])
    old = load_config(TrainConfig, None, [
        "model=smollm2-135m", "data.task=sentiment", "data.k_per_class=4", "data.n_test=50", "data.data_seed=2",
        "data.n_dev=0", "seed=3", "mode=lora", "lora.r=4", "lora.alpha=8", "device=cpu", "optimizer=adamw",
        "lr=0.001", "steps=7", "batch_size=8", "eval_every=0", "checkpoint_every=7", "output_dir=o/run"])
    assert cfg.compare_config() == old
    assert cfg.train_config().mode == "lora"
    assert load_config(KernelConfig, None, ["kernel.params=all"]).train_config().mode == "full"


def test_kernel_cli_show_config_and_bad_override(tmp_path):
    result = CliRunner().invoke(app, ["compute", "-c", "kernel-sentiment", "k=32", "--show-config"])
    assert result.exit_code == 0, result.output
    assert "k: 32" in result.output and "params: lora" in result.output
    result = CliRunner().invoke(app, ["compute", "kernel.output=probabilities"])
    assert result.exit_code != 0 and isinstance(result.exception, FtlabError)
    assert "output" in str(result.exception)
    result = CliRunner().invoke(app, ["compare", "compare.optimizer=lion", "--show-config"])
    assert isinstance(result.exception, FtlabError) and "compare.optimizer" in str(result.exception)
