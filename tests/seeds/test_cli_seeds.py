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
