"""RunDir: a run folder's layout, its readers (torn metrics line, damaged JSON, the weights rule) and
the metrics log's writes (append, truncate on resume)."""

from __future__ import annotations

import json

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


def test_read_metrics_filters_by_split(tmp_path):
    run = RunDir(tmp_path)
    for record in ({"step": 0, "split": "dev", "accuracy": 0.5}, {"step": 1, "split": "train", "loss": 2.0},
                   {"step": 1, "split": "dev", "accuracy": 0.75}):
        run.append_metrics(record)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 1]
    assert run.read_metrics(split="dev") == [{"step": 0, "split": "dev", "accuracy": 0.5},
                                             {"step": 1, "split": "dev", "accuracy": 0.75}]
    assert run.read_metrics(split="train") == [{"step": 1, "split": "train", "loss": 2.0}]


def test_append_metrics_writes_one_json_line_per_record(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "split": "train", "loss": 2.0})
    run.append_metrics({"step": 2, "split": "train", "loss": 1.5, "note": "é"})
    lines = run.metrics.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "split": "train", "loss": 2.0},
                                                    {"step": 2, "split": "train", "loss": 1.5, "note": "é"}]
    assert run.metrics.read_text(encoding="utf-8").endswith("\n")


def test_truncate_metrics_drops_the_tail_after_the_checkpoint_and_torn_lines(tmp_path):
    run = RunDir(tmp_path)
    run.truncate_metrics(3)  # no log yet: nothing to do, nothing written
    assert not run.metrics.exists()
    lines = ['{"step": 0, "split": "dev", "accuracy": 0.5}', '{"step": 1, "split": "train", "loss": 2.0}',
             "not json", '{"split": "train"}', '[1, 2]', '{"step": null}', "",
             '{"step": 3, "split": "train", "loss": 1.0}', '{"step": 4, "split": "train", "loss": 0.9}',
             '{"step": 5, "split": "tr']
    run.metrics.write_text("\n".join(lines))
    run.truncate_metrics(3)
    assert run.metrics.read_text() == "".join(line + "\n" for line in (lines[0], lines[1], lines[7]))
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left behind
    run.truncate_metrics(0)
    assert run.read_metrics() == [{"step": 0, "split": "dev", "accuracy": 0.5}]
    run.truncate_metrics(-1)
    assert run.metrics.read_text() == ""


def test_final_weights_follow_the_stated_preference(tmp_path):
    run = RunDir(tmp_path)
    for prefer in ("last", "best"):
        assert run.weights_file(prefer, fallback=True) is None
        with pytest.raises(FtlabError, match=r"holds no trained weights \(best.safetensors or checkpoint/\)"):
            run.final_weights(prefer, fallback=True)
    save_file({"w": torch.zeros(2)}, str(run.best))
    assert run.final_weights("last", fallback=True)["w"].sum() == 0  # no checkpoint: the best
    assert run.final_weights("best", fallback=False)["w"].sum() == 0
    assert run.weights_file("last", fallback=False) is None
    with pytest.raises(FtlabError, match=r"holds no trained weights \(checkpoint/\)"):
        run.final_weights("last", fallback=False)
    run.checkpoint.mkdir()
    save_file({"w": torch.ones(2)}, str(run.checkpoint_weights))
    assert run.final_weights("last", fallback=True)["w"].sum() == 2  # the last checkpoint over the best
    assert run.final_weights("last", fallback=False)["w"].sum() == 2
    assert run.final_weights("best", fallback=True)["w"].sum() == 0  # the best over the last checkpoint
    assert run.weights_file("best", fallback=True) == run.best
    run.best.unlink()
    assert run.final_weights("best", fallback=True)["w"].sum() == 2
    assert run.weights_file("best", fallback=False) is None
    with pytest.raises(FtlabError, match=r"holds no trained weights \(best.safetensors\)"):
        run.final_weights("best", fallback=False)
    with pytest.raises(ValueError, match="prefer must be"):
        run.weights_file("end", fallback=True)


def test_checkpoint_step(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint_step() is None
    run.checkpoint.mkdir()
    run.checkpoint_state.write_text('{"step": 7, "best_step": 2}')
    assert run.checkpoint_step() == 7
    run.checkpoint_state.write_text('{"step": 7')
    with pytest.raises(FtlabError, match=r"state.json is damaged"):
        run.checkpoint_step()


def test_final_weights_refuses_damaged_weights_files(tmp_path):
    """The studies read a run's weights through final_weights: a flipped bit in best.safetensors
    (its tensors' sha256 is in its metadata) or in the checkpoint's weights (listed in the
    checkpoint's manifest) is a one-line error, not other weights."""
    import torch
    from safetensors.torch import save_file

    from ftlab.errors import FtlabError
    from ftlab.io import write_manifest
    from ftlab.rundir import SHA256_KEY, RunDir, tensors_sha256

    run = RunDir(tmp_path)
    state = {"w": torch.arange(64, dtype=torch.float32)}
    save_file(state, str(run.best), metadata={SHA256_KEY: tensors_sha256(state)})
    run.checkpoint.mkdir()
    save_file(state, str(run.checkpoint_weights))
    write_manifest(run.checkpoint)
    assert torch.equal(run.final_weights("best", fallback=False)["w"], state["w"])
    assert torch.equal(run.final_weights("last", fallback=False)["w"], state["w"])
    for path in (run.best, run.checkpoint_weights):
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10  # a bit of the last tensor's bytes: the file still parses
        path.write_bytes(bytes(data))
    with pytest.raises(FtlabError, match="best.safetensors is damaged"):
        run.final_weights("best", fallback=False)
    with pytest.raises(FtlabError, match="trainable.safetensors is damaged"):
        run.final_weights("last", fallback=False)


def test_a_finished_runs_metrics_are_checked_against_the_recorded_sha256(tmp_path):
    """Plots and studies read a finished run's metrics.jsonl: checked against the sha256 its
    model/ manifest recorded at the end, so an edited loss is an error, not a wrong curve."""
    from ftlab.errors import FtlabError
    from ftlab.io import file_sha256, write_manifest
    from ftlab.rundir import RunDir

    run = RunDir(tmp_path)
    run.metrics.write_text('{"step": 1, "split": "train", "loss": 0.5}\n')
    run.model.mkdir()
    write_manifest(run.model, metrics_sha256=file_sha256(run.metrics))
    assert run.read_metrics("train")[0]["loss"] == 0.5  # not finished yet: not checked either way
    run.results.write_text("{}")
    assert run.read_metrics("train")[0]["loss"] == 0.5
    run.metrics.write_text('{"step": 1, "split": "train", "loss": 0.4}\n')
    with pytest.raises(FtlabError, match="metrics.jsonl is damaged"):
        run.read_metrics()
