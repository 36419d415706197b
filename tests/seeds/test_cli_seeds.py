"""`ftlab seeds run | report` through Typer's test runner, on a tiny model."""

import json

from typer.testing import CliRunner

from ftlab.cli.study import seeds_app

from study_fixtures import task_overrides


def test_seeds_run_then_report(tmp_path, tiny_model_dir, cue_task):
    runner = CliRunner()
    overrides = [f"output_dir={tmp_path / 'study'}", "kinds=[init]", "runs_per_kind=2", "runs_all=0",
                 *task_overrides("train.", tiny_model_dir, cue_task), "train.optimizer=adamw", "train.lr=1e-2",
                 "train.steps=2", "train.batch_size=4", "train.eval_every=2"]
    result = runner.invoke(seeds_app, ["run", *overrides])
    assert result.exit_code == 0, result.output
    assert "init0" in result.output and "init1" in result.output and "2 runs" in result.output
    result = runner.invoke(seeds_app, ["report", str(tmp_path / "study"), "--output", str(tmp_path / "rep"),
                                       "--n-boot", "100", "--pairs", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "| lora/adamw | 2 |" in result.output and len(report["studies"][0]["runs"]) == 2


def test_seeds_topography_command(tmp_path, tiny_model_dir, cue_task):
    runner = CliRunner()
    overrides = [f"output_dir={tmp_path / 'study'}", "kinds=[init]", "runs_per_kind=3", "runs_all=0",
                 *task_overrides("train.", tiny_model_dir, cue_task), "train.optimizer=adamw", "train.lr=1e-2",
                 "train.steps=2", "train.batch_size=4", "train.eval_every=2"]
    assert runner.invoke(seeds_app, ["run", *overrides]).exit_code == 0
    result = runner.invoke(seeds_app, ["topography", str(tmp_path / "study"), "alphas=[0,0.5,1]", "n_train=8",
                                       "surface_points=2", "hutchinson_samples=1", "sharpness_steps=1",
                                       "n_curvature=4", "n_boot=20", "n_perm=50", "cluster_on=train_loss"])
    assert result.exit_code == 0, result.output
    assert "## Basins" in result.output and (tmp_path / "study" / "topography" / "heatmap.png").exists()
    bad = runner.invoke(seeds_app, ["topography", str(tmp_path / "study"), "cluster_on=ood_loss", "n_train=8"])
    assert bad.exit_code != 0 and "no OOD task" in str(bad.exception) + bad.output
