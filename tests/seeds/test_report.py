"""Interpolation between trained runs and the study report, on a tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ftlab import objectives
from ftlab.config import load_config, to_dict
from ftlab.errors import FtlabError
from ftlab.models import load_trained
from ftlab.objectives import Encoder
from ftlab.seeds import SeedStudyConfig, run_study
from ftlab.seeds.interpolation import interpolation_curve
from ftlab.seeds.report import build_report
from ftlab.train import load_run_data

from study_fixtures import task_overrides


def _study(tmp_path, model, task, *extra):
    return load_config(SeedStudyConfig, None, [
        f"output_dir={tmp_path / 'study'}", "kinds=[order, init]", "runs_per_kind=2", "runs_all=0",
        *task_overrides("train.", model, task), "train.optimizer=adamw", "train.lr=3e-2",
        "train.steps=4", "train.batch_size=4", "train.eval_every=4", "train.lora.r=4", *extra])


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir, cue_task):
    """Three trained runs (base, order1, init1), shared by the tests of this module (read only)."""
    cfg = _study(tmp_path_factory.mktemp("seeds"), tiny_model_dir, cue_task)
    return cfg, {r["name"]: r for r in run_study(cfg, progress=False)}


def _reference_loss(run_dir, cfg, data):
    """Mean test loss of a run's saved model, in one batch, through objectives.loss."""
    module, tokenizer = load_trained(cfg.train.model, run_dir / "model")
    encoder = Encoder(tokenizer, data.spec, max_length=cfg.train.data.max_length)
    batch = objectives.training_batch(encoder, data.splits.test)
    with torch.no_grad():
        return float(objectives.loss(module, batch, encoder.option_ids))


def test_interpolation_endpoints_reproduce_each_run(study):
    cfg, records = study
    data = load_run_data(cfg.train)
    runs = cfg.output_dir + "/runs/"
    a, b = "order0-init0", "order0-init1"
    curve = interpolation_curve(runs + a, runs + b, data.spec, data.splits.test, alphas=[0.0, 0.5, 1.0])
    start, middle, end = curve["points"]
    assert start["accuracy"] == pytest.approx(records[a]["test"]["accuracy"])
    assert end["accuracy"] == pytest.approx(records[b]["test"]["accuracy"])
    assert start["loss"] == pytest.approx(_reference_loss(Path(runs + a), cfg, data), rel=1e-5)
    assert end["loss"] == pytest.approx(_reference_loss(Path(runs + b), cfg, data), rel=1e-5)
    line = (start["accuracy"] + end["accuracy"]) / 2
    assert curve["accuracy_barrier"] == pytest.approx(max(0.0, line - middle["accuracy"]))
    assert curve["loss_barrier"] >= 0


def test_report_statistics_plots_and_cache(study, tmp_path):
    cfg, records = study
    report = build_report([cfg.output_dir], tmp_path / "report", n_boot=200, barrier_pairs=2)
    (s,) = report["studies"]
    scores = np.array([records[r["name"]]["test_scores"] for r in s["runs"]])
    assert s["multi_bootstrap"]["estimate"] == pytest.approx(scores.mean())
    assert s["test"]["n"] == 3 and len(s["expected_max"]["mean"]) == 3 and s["expected_max"]["on"] == "dev"
    assert s["expected_max"]["mean"][0] == pytest.approx(np.mean([r["best_dev"] for r in records.values()]))
    assert set(s["variance"]) == {"order", "init"}
    assert [b["kind"] for b in s["barriers"]] == ["order", "init"]
    for name in ("report.md", "report.json", "report.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "multi-bootstrap" in (tmp_path / "report" / "report.md").read_text()
    cache = Path(cfg.output_dir) / "barriers.json"
    stamp = cache.stat().st_mtime_ns
    again = build_report([cfg.output_dir], tmp_path / "report2", n_boot=200, barrier_pairs=2)
    assert cache.stat().st_mtime_ns == stamp and again["studies"][0]["barriers"] == s["barriers"]


def test_report_refuses_studies_of_another_task(tmp_path):
    for name, task in (("a", "sentiment"), ("b", "trec")):
        (tmp_path / name).mkdir()
        study = SeedStudyConfig(output_dir=str(tmp_path / name))
        study.train.data.task = task
        (tmp_path / name / "study.json").write_text(json.dumps(to_dict(study)))
    with pytest.raises(FtlabError, match="disagree on task"):
        build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    with pytest.raises(FtlabError, match="not found"):
        build_report([tmp_path / "missing"], tmp_path / "report")
