"""``report_to``: a run's metrics mirrored to TensorBoard and W&B, equal to metrics.jsonl (resume
included), refused before anything is written when a reporter is not installed."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from ftlab.errors import FtlabError
from ftlab.reporting import MetricsLog, scalars
from ftlab.rundir import RunDir
from ftlab.train import _metrics_log, train

from run_fixtures import tiny_run_cfg, tiny_run_data


class _Killed(Exception):
    pass


def _kill_at_3(step, record):
    if step == 3:
        raise _Killed


def _run(cfg, model_factory, tokenizer, **kwargs):
    return train(cfg, progress=False, model_and_tokenizer=(model_factory("llama"), tokenizer), data=tiny_run_data(),
                 **kwargs)


def _expected(out) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl and the test results as ``{tag: [(step, value), ...]}``."""
    results = json.loads((out / "results.json").read_text())
    records = RunDir(out).read_metrics() + [{"step": results["steps"], "split": "test", **results["test"]}]
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in scalars(record).items():
            series.setdefault(tag, []).append((record["step"], value))
    return series


def test_tensorboard_mirrors_metrics_jsonl_across_a_resume(tmp_path, tiny_model_factory, tiny_tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = tiny_run_cfg(out, "report_to=[tensorboard]", steps=4, eval_every=2, checkpoint_every=2)
    with pytest.raises(_Killed):  # after step 3 was logged; the checkpoint is at step 2
        _run(cfg, tiny_model_factory, tiny_tokenizer, callback=_kill_at_3)
    killed = EventAccumulator(str(out / "tensorboard"))
    killed.Reload()
    assert [e.step for e in killed.Scalars("train/loss")] == [1, 2, 3]
    _run(cfg, tiny_model_factory, tiny_tokenizer)  # resumes from step 2: step 3 again, then 4

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = _expected(out)
    assert set(got) == set(expected) >= {"train/loss", "train/lr", "dev/accuracy", "test/accuracy"}
    for tag, points in expected.items():  # float32 in the event file
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # each step once
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]


class FakeWandb:
    """The part of the wandb module ftlab calls, recording the calls."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
        return kwargs

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, numbers, step):
        self.logged.append((step, numbers))

    def finish(self):
        self.finished += 1


def test_report_to_may_change_on_resuming(tmp_path, tiny_model_factory, tiny_tokenizer):
    """A run killed without reporters resumes with one (and keep changed too): TensorBoard gets
    the steps from the resume on, and the test metrics."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = tiny_run_cfg(out, steps=4, eval_every=2, checkpoint_every=2)
    with pytest.raises(_Killed):
        _run(cfg, tiny_model_factory, tiny_tokenizer, callback=_kill_at_3)
    resumed = tiny_run_cfg(out, "report_to=[tensorboard]", "keep=best", steps=4, eval_every=2, checkpoint_every=2)
    results = _run(resumed, tiny_model_factory, tiny_tokenizer)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [3, 4]
    assert [e.value for e in events.Scalars("test/accuracy")] == pytest.approx([results["test"]["accuracy"]])


def test_wandb_gets_every_record_once_and_a_resume_continues_its_run(tmp_path, tiny_model_factory, tiny_tokenizer,
                                                                     monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    cfg = tiny_run_cfg(out, "report_to=[wandb]", steps=4, eval_every=2, checkpoint_every=2)
    with pytest.raises(_Killed):
        _run(cfg, tiny_model_factory, tiny_tokenizer, callback=_kill_at_3)
    logged_before_kill = len(fake.logged)
    _run(cfg, tiny_model_factory, tiny_tokenizer)
    first, second = fake.inits
    assert first["id"] == second["id"] == (out / "wandb-run-id").read_text().strip() and first["resume"] == "allow"
    assert first["dir"] == str(out) and first["config"]["report_to"] == ["wandb"] and first["config"]["steps"] == 4
    resumed = fake.logged[logged_before_kill:]
    expected = [(r["step"], scalars(r)) for r in RunDir(out).read_metrics() if r["step"] > 2]
    results = json.loads((out / "results.json").read_text())
    expected.append((4, {f"test/{k}": float(v) for k, v in results["test"].items()}))
    assert resumed == expected and fake.finished == 1  # the killed process never finished its run


def test_wandb_offline_writes_a_run(tmp_path, tiny_model_factory, tiny_tokenizer, monkeypatch):
    """The real wandb, offline: the run folder's W&B run holds the scalars (uploadable with wandb sync)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    _run(tiny_run_cfg(out, "report_to=[wandb]", steps=2, eval_every=1), tiny_model_factory, tiny_tokenizer)
    run_id = (out / "wandb-run-id").read_text().strip()
    (log,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = log.read_bytes()  # protobuf records: the tags are in it as written
    assert all(tag.encode() in data for tag in ("train/loss", "train/lr", "dev/accuracy", "test/accuracy"))


@pytest.mark.parametrize("reporter", ["tensorboard", "wandb"])
def test_a_reporter_not_installed_is_refused_before_anything_is_written(tmp_path, reporter, monkeypatch,
                                                                        tiny_model_factory, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, reporter, None)  # import fails, find_spec finds nothing
    out = tmp_path / "run"
    with pytest.raises(FtlabError) as e:
        _run(tiny_run_cfg(out, f"report_to=[{reporter}]"), tiny_model_factory, tiny_tokenizer)
    message = str(e.value)
    assert message.startswith(f"config.report_to: {reporter} is not installed: pip install 'ftlab[report]'")
    assert "\n" not in message and not out.exists()


def test_only_rank_0_reports(tmp_path):
    cfg = tiny_run_cfg(tmp_path / "run", "report_to=[tensorboard]")
    log = _metrics_log(cfg, RunDir(tmp_path / "run"), False, 0)
    log({"step": 1, "split": "train", "loss": 0.5, "lr": 1e-3})
    assert log.end({"steps": 1, "test": {"accuracy": 1.0}})["steps"] == 1
    assert not (tmp_path / "run").exists()


def test_a_record_becomes_its_numbers_by_split():
    record = {"step": 3, "split": "train", "loss": None, "lr": 0.1, "skipped": "non-finite loss", "n": 4, "ok": True}
    assert scalars(record) == {"train/lr": 0.1, "train/n": 4.0}
    seen = []

    class Spy:
        def log(self, step, numbers):
            seen.append((step, numbers))

        def close(self):
            seen.append("closed")

    log = MetricsLog(reporters=[Spy()])
    log({"step": 1, "split": "dev", "accuracy": 0.5})
    log.end({"steps": 2, "test": {"accuracy": 0.75}})
    assert seen == [(1, {"dev/accuracy": 0.5}), (2, {"test/accuracy": 0.75}), "closed"]
