"""Run folders (ftlab.runs): ftlab never deletes or writes into a folder it did not create, and two
commands never write one folder at once (the lock), while a lock left by a dead process is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest
from seeds.study_fixtures import cue_task, tiny_model_dir  # noqa: F401  (fixtures)

from ftlab.config import TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.runs import LOCK, MARKER, RunLock, claim_and_lock, claim_dir, new_dir, overwrite_dir, read_marker
from ftlab.tasks.base import Example, TaskSpec
from ftlab.train import train

from run_fixtures import tiny_run_cfg, tiny_run_data


def _user_folder(path):
    """A folder of the user's own files (what the probe's --overwrite deleted)."""
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("three years of work")
    (path / "data").mkdir()
    (path / "data" / "results.csv").write_text("a,b\n1,2\n")
    return path


def _survived(path):
    return ((path / "thesis.tex").read_text() == "three years of work"
            and (path / "data" / "results.csv").read_text() == "a,b\n1,2\n")


def _data():
    return tiny_run_data()


def _cfg(out, *overrides):
    return tiny_run_cfg(out, *overrides)


def _train(cfg, tiny_model_factory, tiny_tokenizer):
    return train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
                 data=_data())


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid no longer names a process
    return child.pid


def _one_line(error):
    return len(str(error).splitlines()) == 1


# -- marker and claim -----------------------------------------------------------------------


def test_claim_creates_and_marks_and_refuses_user_folders(tmp_path):
    out = claim_dir(tmp_path / "a" / "run", "train")
    assert read_marker(out)["kind"] == "train" and read_marker(out)["ftlab_version"]
    assert claim_dir(out, "train") == out  # its own folder again: fine
    with pytest.raises(FtlabError, match="is an ftlab train folder, not a kernel one"):
        claim_dir(out, "kernel")
    (tmp_path / "empty").mkdir()
    assert read_marker(claim_dir(tmp_path / "empty", "select"))["kind"] == "select"
    user = _user_folder(tmp_path / "mine")
    with pytest.raises(FtlabError, match=r"exists and was not written by ftlab \(no \.ftlab-run\.json\)") as e:
        claim_dir(user, "train")
    assert _one_line(e.value) and _survived(user) and not (user / MARKER).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FtlabError, match="is a file"):
        claim_dir(tmp_path / "file", "train")


def test_a_run_folder_from_before_the_marker_is_still_ftlabs(tmp_path):
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "metrics.jsonl").write_text("")
    (old / "checkpoint").mkdir()
    claim_dir(old, "train")
    assert read_marker(old)["kind"] == "train"


def test_train_refuses_a_folder_of_user_files(tmp_path, tiny_model_factory, tiny_tokenizer):
    user = _user_folder(tmp_path / "mine")
    with pytest.raises(FtlabError, match="was not written by ftlab"):
        _train(_cfg(user), tiny_model_factory, tiny_tokenizer)
    assert _survived(user) and sorted(p.name for p in user.iterdir()) == ["data", "thesis.tex"]


# -- overwrite ------------------------------------------------------------------------------


def test_overwrite_deletes_only_ftlab_folders(tmp_path, tiny_model_factory, tiny_tokenizer):
    user = _user_folder(tmp_path / "mine")
    with pytest.raises(FtlabError, match="ftlab never deletes folders it did not create") as e:
        overwrite_dir(user, "train")
    assert _one_line(e.value) and _survived(user)
    run = tmp_path / "run"
    _train(_cfg(run), tiny_model_factory, tiny_tokenizer)
    assert (run / "results.json").exists() and read_marker(run)["kind"] == "train"
    with pytest.raises(FtlabError, match="not a seeds one"):
        overwrite_dir(run, "seeds")
    assert overwrite_dir(run, "train") and not run.exists()
    assert not [p for p in tmp_path.iterdir() if "replaced" in p.name]  # the moved-aside copy is gone
    assert not overwrite_dir(run, "train")  # nothing there: nothing to do


def test_overwrite_refuses_a_folder_in_use(tmp_path):
    run = claim_dir(tmp_path / "run", "train")
    with RunLock(run):
        with pytest.raises(FtlabError, match="is in use by pid"):
            overwrite_dir(run, "train")
    assert run.exists()


def test_cli_overwrite_refuses_a_user_folder_in_one_line(tmp_path):
    user = _user_folder(tmp_path / "mine")
    result = subprocess.run([sys.executable, "-m", "ftlab.cli", "train", f"output_dir={user}", "--overwrite"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not written by ftlab" in lines[0], result.stderr
    assert _survived(user)


# -- the lock -------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "mezo"])
def test_a_second_training_into_a_locked_folder_is_refused(tmp_path, tiny_model_factory, tiny_tokenizer,
                                                           optimizer):
    cfg = _cfg(tmp_path / "run", f"optimizer={optimizer}")
    with claim_and_lock(cfg.output_dir, "train"):  # the first training, still running
        with pytest.raises(FtlabError) as e:
            _train(cfg, tiny_model_factory, tiny_tokenizer)
        assert _one_line(e.value)
        assert (f"is in use by pid {os.getpid()} on host {socket.gethostname()} since" in str(e.value)
                and "another ftlab command is writing it" in str(e.value))
        assert not (tmp_path / "run" / "config.json").exists()  # the refused one wrote nothing
    # Released with the first command: the next one runs, and releases it in turn.
    _train(cfg, tiny_model_factory, tiny_tokenizer)
    assert not (tmp_path / "run" / LOCK).exists()


def test_the_lock_is_released_when_training_fails(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg = _cfg(tmp_path / "run")

    def boom(step, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=_data(), callback=boom)
    assert not (tmp_path / "run" / LOCK).exists()
    _train(cfg, tiny_model_factory, tiny_tokenizer)  # resumes


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_model_factory, tiny_tokenizer, caplog):
    run = claim_dir(tmp_path / "run", "train")
    dead = _dead_pid()
    (run / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                        "started": "2024-01-01T00:00:00+00:00"}))
    results = _train(_cfg(run), tiny_model_factory, tiny_tokenizer)
    assert results["steps"] == 2
    assert f"taking over a stale lock of pid {dead}" in caplog.text
    assert [(r.name, r.levelname) for r in caplog.records] == [("ftlab.runs", "WARNING")]
    assert not (run / LOCK).exists()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    run = claim_dir(tmp_path / "run", "train")
    (run / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": "another-host.example",
                                        "started": "2024-01-01T00:00:00+00:00"}))
    with pytest.raises(FtlabError, match="in use by pid .* on host another-host.example"):
        RunLock(run).acquire()


def test_the_lock_holds_against_another_process(tmp_path):
    run = claim_dir(tmp_path / "run", "train")
    code = ("import sys; from ftlab.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FtlabError, match=f"in use by pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run / LOCK).exists()  # released at exit (atexit)
    with RunLock(run):
        pass


def test_a_killed_holder_leaves_a_lock_that_is_taken_over(tmp_path, caplog):
    run = claim_dir(tmp_path / "run", "train")
    code = "import os, sys; from ftlab.runs import RunLock; RunLock(sys.argv[1]).acquire(); os._exit(9)"
    subprocess.run([sys.executable, "-c", code, str(run)], timeout=120)
    assert (run / LOCK).exists()  # a kill runs no atexit
    with RunLock(run) as lock:
        assert lock.held
    assert "taking over a stale lock" in caplog.text


def test_the_cli_prints_the_taken_over_lock_warning(tmp_path, capsys, monkeypatch):
    import logging

    from ftlab.cli import show_library_warnings

    logger = logging.getLogger("ftlab")
    monkeypatch.setattr(logger, "handlers", [])  # restored after the test
    show_library_warnings()
    show_library_warnings()  # once only
    assert len(logger.handlers) == 1
    run = claim_dir(tmp_path / "run", "train")
    dead = _dead_pid()
    (run / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                        "started": "2024-01-01T00:00:00+00:00"}))
    with RunLock(run):
        pass
    assert f"warning: {run}: taking over a stale lock of pid {dead} (no longer running, started " \
           "2024-01-01T00:00:00+00:00); the folder keeps what that command wrote\n" == capsys.readouterr().err


# -- whole folders (replay --output) ---------------------------------------------------------


def test_new_dir_writes_through_a_temporary_folder(tmp_path):
    out = tmp_path / "replayed"
    with new_dir(out, "replay") as tmp:
        assert tmp != out and not out.exists()
        (tmp / "weights").write_text("v1")
    assert (out / "weights").read_text() == "v1" and read_marker(out)["kind"] == "replay"
    with pytest.raises(FtlabError, match="already holds an ftlab replay output; pass --overwrite"):
        with new_dir(out, "replay"):
            pass
    with pytest.raises(RuntimeError):
        with new_dir(out, "replay", overwrite=True) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (out / "weights").read_text() == "v1"  # a failed replay leaves the old output
    with new_dir(out, "replay", overwrite=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert (out / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replayed"]  # no temporaries left


def test_cli_replay_refuses_an_existing_output(tmp_path):
    user = _user_folder(tmp_path / "mine")
    result = subprocess.run([sys.executable, "-m", "ftlab.cli", "replay", str(tmp_path / "no-run"),
                             "--output", str(user), "--overwrite"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not written by ftlab" in lines[0], result.stderr
    assert _survived(user)


def test_cli_replay_writes_a_new_folder_and_replaces_only_with_overwrite(
        tmp_path, tiny_model_dir, cue_task):  # noqa: F811
    from typer.testing import CliRunner

    from ftlab.cli import app

    cfg = load_config(TrainConfig, None, [
        f"output_dir={tmp_path / 'run'}", f"model={tiny_model_dir}", f"data.task={cue_task}",
        "data.template={text} It was", "data.options=[' terrible', ' great']", "data.n_train=16", "data.n_dev=0",
        "data.n_test=0", "optimizer=mezo", "steps=3", "batch_size=4", "eval_every=0", "lr=1e-3", "mode=lora",
        "lora.r=2"])
    train(cfg, progress=False)
    out = tmp_path / "replayed"
    runner = CliRunner()
    result = runner.invoke(app, ["replay", str(tmp_path / "run"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").exists() and read_marker(out)["kind"] == "replay"
    again = runner.invoke(app, ["replay", str(tmp_path / "run"), "--output", str(out)])
    assert isinstance(again.exception, FtlabError) and "pass --overwrite" in str(again.exception)
    assert runner.invoke(app, ["replay", str(tmp_path / "run"), "--output", str(out), "--overwrite"]).exit_code == 0


# -- the other commands that write folders ---------------------------------------------------


def test_every_folder_writing_command_claims_its_folder(tmp_path, tiny_model, tiny_tokenizer):
    from ftlab.kernel import KernelSpec, compute_kernel
    from ftlab.scaling.experiment import ScalingExperimentConfig, run_experiment
    from ftlab.seeds import SeedStudyConfig, run_study
    from ftlab.select.pipeline import SelectConfig, run_pipeline

    user = _user_folder(tmp_path / "mine")
    spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
    exs = [Example(id=f"e{i}", fields={"text": "the movie"}, label=i % 2) for i in range(4)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "p0", "prompt": "hi", "response": "yo"}) + "\n")
    calls = {
        "kernel": lambda: compute_kernel(tiny_model, tiny_tokenizer, spec, exs, [], KernelSpec(params="all"), user,
                                         progress=False),
        "select": lambda: run_pipeline(SelectConfig(pool=[str(pool)], method="random", output_dir=str(user)),
                                       progress=False),
        "seeds": lambda: run_study(SeedStudyConfig(output_dir=str(user)), progress=False),
        "scale": lambda: run_experiment(ScalingExperimentConfig(output_dir=str(user), train=TrainConfig(
            eval_every=8, steps=16, batch_size=8)), progress=False),
    }
    for kind, call in calls.items():
        with pytest.raises(FtlabError, match="was not written by ftlab"):
            call()
        assert _survived(user) and not (user / MARKER).exists(), kind


def test_check_settings_is_one_rule_for_every_folder(tmp_path):
    """Stored vs new settings: a key one side lacks counts as its default; ignored keys never
    count; the error names the folder, what it holds, and each stored and new value."""
    from ftlab.runs import check_settings

    check_settings(tmp_path, "run", None, {"lr": 1.0})  # nothing stored yet: nothing to refuse
    check_settings(tmp_path, "run", {"lr": 1.0}, {"lr": 1.0, "steps": 5}, defaults={"steps": 5})
    check_settings(tmp_path, "kernel", {"a": 1, "complete": True}, {"a": 1, "complete": False}, ignore=("complete",))
    with pytest.raises(FtlabError, match=r"holds a run written with other settings \(stored vs now: "
                                          r"\{'lr': \(1\.0, 2\.0\), 'steps': \(5, 6\)\}\)"):
        check_settings(tmp_path, "run", {"lr": 1.0}, {"lr": 2.0, "steps": 6}, defaults={"steps": 5})
    with pytest.raises(FtlabError, match=str(tmp_path)):
        check_settings(tmp_path, "warm-up", {"x": 1}, {})
