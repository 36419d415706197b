"""The scaling experiment on a tiny model: the runs it plans, its curves, distances and noise check."""

import json

import pytest
import torch
from seeds.study_fixtures import task_overrides

from ftlab.config import load_config
from ftlab.errors import FtlabError
from ftlab.scaling.experiment import (
    ScalingExperimentConfig,
    curve_distance,
    noise_statistics,
    run_experiment,
    variant_configs,
)


def _exp(tmp_path, model="m", task="t", *extra):
    return load_config(ScalingExperimentConfig, None, [
        f"output_dir={tmp_path / 'exp'}", "kappa=2", *task_overrides("train.", model, task), "train.optimizer=adamw",
        "train.lr=1e-2", "train.steps=4", "train.batch_size=2", "train.eval_every=2", "n_probe=4", *extra])


def test_variants_see_the_same_samples(tmp_path):
    configs = variant_configs(_exp(tmp_path, "m", "t", "kappa=4", "train.steps=8", "train.eval_every=4"))
    assert list(configs) == ["base", "rule", "naive", "linear"]
    for name in ("rule", "naive", "linear"):
        c = configs[name]
        assert c.batch_size * c.steps == 2 * 8 and c.eval_every * c.batch_size == 4 * 2
    assert configs["rule"].lr == pytest.approx(2e-2) and configs["rule"].adam_betas == pytest.approx([0.6, 0.996])
    assert configs["naive"].lr == 1e-2 and configs["naive"].adam_betas == [0.9, 0.999]
    assert configs["linear"].lr == pytest.approx(4e-2)


@pytest.mark.parametrize("extra,match", [(["kappa=0"], "kappa must be a positive"), (["kappa=5"], "multiple of kappa"),
                                         (["variants=[cubic]"], "unknown variant"),
                                         (["kappa=16"], "beta1 = -0.6 after scaling")])
def test_bad_experiments(tmp_path, extra, match):
    with pytest.raises(FtlabError, match=match):
        variant_configs(_exp(tmp_path, "m", "t", "train.steps=48", "train.eval_every=48", *extra))


def test_curve_distance_by_hand():
    base = {"dev_samples": [0, 8, 16], "dev": [0.5, 0.7, 0.9], "loss_samples": [8, 16], "loss": [1.0, 0.5]}
    other = {"dev_samples": [0, 8, 16], "dev": [0.5, 0.6, 0.6], "loss_samples": [8, 16], "loss": [1.2, 0.5]}
    d = curve_distance(base, other)
    assert d["dev_mean_abs"] == pytest.approx(0.4 / 3) and d["loss_mean_abs"] == pytest.approx(0.1)
    assert d["final_dev_gap"] == pytest.approx(-0.3) and "dev_loss_mean_abs" not in d
    d = curve_distance({**base, "dev_loss": [0.7, 0.6, 0.5]}, {**other, "dev_loss": [0.7, 0.65, 0.3]})
    assert d["dev_loss_mean_abs"] == pytest.approx(0.25 / 3)


def test_noise_statistics_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(200, 3, generator=gen, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0]).double()
    s = noise_statistics(grads, batch_size=4, kappa=2)
    cov = torch.cov(grads.T)  # unbiased, as the estimator's trace
    assert s["trace_cov"] == pytest.approx(float(torch.trace(cov)))
    assert s["grad_norm_sq"] == pytest.approx(float(grads.mean(0) @ grads.mean(0)) - s["trace_cov"] / 200)
    # True values: tr Sigma = 12, |g|^2 = 1; N/G at batch 4 = 3, at batch 8 = 1.5.
    assert s["trace_cov"] == pytest.approx(12, rel=0.2) and s["noise_to_signal_B"] == pytest.approx(3, rel=0.5)
    assert s["noise_to_signal_kappaB"] == pytest.approx(s["noise_to_signal_B"] / 2)
    assert s["kappa_star_lower_bound"] <= s["kappa_star"]
    # Mean (0.05, 0), tr Sigma = 4.01 / 3: the unbiased G = 0.0025 - 4.01 / 12 < 0 is unresolved,
    # leaving only the bound tr Sigma / (B |g_mean|^2) = (4.01 / 3) / (4 x 0.0025).
    swamped = noise_statistics(torch.tensor([[1.1, 0], [-0.9, 0], [0, 1], [0, -1]], dtype=torch.float64), 4, 2)
    assert swamped["kappa_star"] is None and swamped["noise_to_signal_B"] is None
    assert swamped["kappa_star_lower_bound"] == pytest.approx(4.01 / 3 / 0.01)


def test_experiment_end_to_end(tmp_path, tiny_model_dir, cue_task):
    result = run_experiment(_exp(tmp_path, tiny_model_dir, cue_task, "variants=[rule, naive]"), progress=False)
    assert set(result["curves"]) == {"base", "rule", "naive"}
    base = result["curves"]["base"]
    for name in ("rule", "naive"):
        c = result["curves"][name]
        assert c["dev_samples"] == base["dev_samples"] == [0, 4, 8]
        assert c["loss_samples"] == base["loss_samples"] == [4, 8]
        assert c["dev"][0] == base["dev"][0] and c["dev_loss"][0] == base["dev_loss"][0]  # same init and dev set
        assert result["distance"][name]["dev_loss_mean_abs"] >= 0
    metrics = [json.loads(line) for line in (tmp_path / "exp" / "base" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in metrics if r["split"] == "train"]
    assert base["loss"] == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2])
    assert set(result["noise"]) == {"n_probe", "start", "end"} and result["noise"]["start"]["trace_cov"] > 0
    assert (tmp_path / "exp" / "experiment.png").stat().st_size > 0
    again = run_experiment(_exp(tmp_path, tiny_model_dir, cue_task, "variants=[rule, naive]", "n_probe=0"),
                           progress=False)  # finished runs are reused, not retrained
    assert again["curves"] == result["curves"]


def test_run_curves_and_summary_read_the_run_folder_through_rundir(tmp_path):
    from ftlab.rundir import RunDir
    from ftlab.scaling.compare import run_summary
    from ftlab.scaling.experiment import run_curves

    run = RunDir(tmp_path)
    run.config.write_text(json.dumps({"batch_size": 2}))
    run.results.write_text(json.dumps({"test": {"accuracy": 0.5}}))
    for step in range(1, 5):
        run.append_metrics({"step": step, "split": "train", "loss": float(step)})
        if step % 2 == 0:
            run.append_metrics({"step": step, "split": "dev", "accuracy": step / 10, "loss": 1.0 / step, "n": 4})
    with run.metrics.open("a") as f:
        f.write('{"step": 5, "split": "tr')  # a kill cut the last line in half
    curves = run_curves(tmp_path, window=4)
    assert curves["loss_samples"] == [4, 8] and curves["loss"] == [1.5, 3.5]
    assert curves["dev_samples"] == [4, 8] and curves["dev"] == [0.2, 0.4] and curves["dev_loss"] == [0.5, 0.25]
    summary = run_summary(tmp_path, window=4)
    assert summary["results"] == {"test": {"accuracy": 0.5}} and summary["curves"] == curves
    assert summary["last"] == {"step": 4, "split": "train", "loss": 4.0}
