"""RunDir: a run folder's layout and its readers (torn metrics line, damaged JSON, end weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ftlab.errors import FtlabError
from ftlab.rundir import RunDir


def test_paths_are_the_files_train_writes(tmp_path):
    run = RunDir(tmp_path)
    assert {p.name for p in (run.config, run.metrics, run.checkpoint, run.best, run.trajectory, run.model,
                             run.results, run.plot)} == set(RunDir.NAMES)
    assert run.checkpoint_weights.parent == run.checkpoint and not run.finished()


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
    assert run.read_metrics() == [{"step": 1, "split": "train", "loss": 2.0}]


def test_read_json_names_a_missing_or_damaged_file(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FtlabError, match="config.json not found"):
        run.read_config()
    run.results.write_text("{not json")
    with pytest.raises(FtlabError, match=r"results.json is damaged \(JSONDecodeError"):
        run.read_results()


def test_final_weights_prefer_the_last_checkpoint_over_the_best(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FtlabError, match="holds no trained weights"):
        run.final_weights()
    save_file({"w": torch.zeros(2)}, str(run.best))
    assert run.final_weights()["w"].sum() == 0
    run.checkpoint.mkdir()
    save_file({"w": torch.ones(2)}, str(run.checkpoint_weights))
    assert run.final_weights()["w"].sum() == 2
