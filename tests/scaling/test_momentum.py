"""The momentum experiment on a tiny model: the runs it plans, its distances, intervals and plot,
and the rule itself on a quadratic where it is exact in the small-lr limit."""

import json

import pytest
import torch
from seeds.study_fixtures import task_overrides

from ftlab.config import load_config
from ftlab.errors import FtlabError
from ftlab.scaling.compare import mean_ci
from ftlab.scaling.momentum import MomentumExperimentConfig, run_configs, run_momentum_experiment


def _exp(tmp_path, model="m", task="t", *extra):
    return load_config(MomentumExperimentConfig, None, [
        f"output_dir={tmp_path / 'exp'}", *task_overrides("train.", model, task), "train.optimizer=sgd",
        "train.steps=4", "train.batch_size=4", "train.eval_every=2", "train.max_grad_norm=null",
        "lrs=[0.01, 0.5]", "seeds=[0, 1]", *extra])


def test_planned_runs(tmp_path):
    configs = run_configs(_exp(tmp_path))
    assert len(configs) == 2 * 3 * 2
    assert (configs[(0.01, "momentum", 1)].lr, configs[(0.01, "momentum", 1)].momentum) == (0.01, 0.9)
    assert configs[(0.01, "effective", 0)].lr == pytest.approx(0.1) and configs[(0.01, "effective", 0)].momentum == 0
    assert (configs[(0.5, "plain", 0)].lr, configs[(0.5, "plain", 0)].momentum) == (0.5, 0.0)
    assert configs[(0.5, "plain", 1)].seed == 1
    assert len({c.output_dir for c in configs.values()}) == len(configs)


@pytest.mark.parametrize("extra, match", [(["train.optimizer=adamw"], "set train.optimizer=sgd"),
                                          (["beta=1.0"], r"beta: must be in \(0, 1\)"),
                                          (["lrs=[]"], "lrs: give one or more"),
                                          (["seeds=[0, 0]"], "distinct seeds")])
def test_bad_experiments(tmp_path, extra, match):
    with pytest.raises(FtlabError, match=match):
        run_configs(_exp(tmp_path, "m", "t", *extra))


def test_t_interval_by_hand():
    ci = mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302652729911275
    assert ci["mean"] == 2 and ci["std"] == pytest.approx(1.0)
    assert ci["high"] - 2 == pytest.approx(4.302652729911275 / 3 ** 0.5)
    assert mean_ci([0.5])["low"] == mean_ci([0.5])["high"] == 0.5


def test_the_rule_on_a_noisy_quadratic():
    """Heavy ball at (eta, beta) against plain SGD at eta / (1 - beta) and at eta, on
    L = x^2 / 2 with gradient noise: at small eta the first pair's iterates stay close, at large
    eta they do not (the regime the experiment probes on the LM)."""
    def run(lr, beta, steps):
        g = torch.Generator().manual_seed(0)
        x, m, xs = torch.tensor(1.0, dtype=torch.float64), 0.0, []
        for _ in range(steps):
            m = beta * m + x + 0.1 * torch.randn((), generator=g, dtype=torch.float64)
            x = x - lr * m
            xs.append(float(x))
        return torch.tensor(xs)
    for eta, close in ((1e-3, True), (0.15, False)):
        steps = round(3 / (eta / 0.1))  # the same time eta / (1 - beta) x steps = 3 for both
        mom, eff, plain = run(eta, 0.9, steps), run(eta / 0.1, 0.0, steps), run(eta, 0.0, steps)
        ratio = float((mom - eff).abs().mean() / (mom - plain).abs().mean())
        assert (ratio < 0.1) if close else (ratio > 0.5), (eta, ratio)


def test_experiment_on_a_tiny_model(tmp_path, tiny_model_dir, cue_task):
    exp = _exp(tmp_path, tiny_model_dir, cue_task, "lrs=[0.05]", "seeds=[0, 1]")
    result = run_momentum_experiment(exp, progress=False)
    entry = result["lrs"]["lr0.05"]
    for key in ("momentum_to_effective", "momentum_to_plain"):
        d = entry["distance"][key]["dev_loss_mean_abs"]
        assert d["n"] == 2 and d["low"] <= d["mean"] <= d["high"] and d["mean"] > 0
    assert entry["ratio_dev_loss"] == pytest.approx(
        entry["distance"]["momentum_to_effective"]["dev_loss_mean_abs"]["mean"]
        / entry["distance"]["momentum_to_plain"]["dev_loss_mean_abs"]["mean"])
    assert set(entry["test"]) == {"momentum", "effective", "plain"}
    # the mean curves are the seeds' means
    one = [json.loads(line) for line in (tmp_path / "exp/lr0.05/plain/seed0/metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "exp/lr0.05/plain/seed1/metrics.jsonl").read_text().splitlines()]
    dev = lambda rows: [r["loss"] for r in rows if r["split"] == "dev"]  # noqa: E731
    assert entry["mean_curves"]["plain"]["dev_loss"] == pytest.approx([(a + b) / 2 for a, b in zip(dev(one), dev(two))])
    assert (tmp_path / "exp/momentum.png").stat().st_size > 10_000
    again = run_momentum_experiment(exp, progress=False)  # finished runs are read, not retrained
    assert again["lrs"] == json.loads(json.dumps(result["lrs"]))
