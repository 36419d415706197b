"""Issue 28's reliability audit, part 1: what a new user's mistakes did to their files and folders.

* user files: ``--overwrite`` and ``replay --output`` delete only a folder ftlab marked and
  created, holding only what ftlab writes, and only once every input of the command is checked;
* checked too late: bad settings and inputs are refused before anything is written, in one
  line naming the field;
* others: one run folder written two ways, a deleted checkpoint state, a symlinked output_dir,
  ``eval --output`` onto a file, ``tint eval`` on a data file.
"""

import json

import pytest
from seeds.study_fixtures import cue_task, tiny_model_dir  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from ftlab.cli import app
from ftlab.config import ConfigError, TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.runs import LOCK, MARKER, claim_dir, new_dir, overwrite_dir, read_marker
from ftlab.train import train

from run_fixtures import tiny_run_cfg, tiny_run_data


def _one_line(error):
    return len(str(error).strip().splitlines()) == 1


def _files(folder):
    """Every file under ``folder`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_train(cfg, tiny_model_factory, tiny_tokenizer):
    return train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
                 data=tiny_run_data())


def _cli(*args):
    """Run ``ftlab ARGS`` in this process: (exit code, the FtlabError raised or None, output)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    error = result.exception if isinstance(result.exception, FtlabError) else None
    if result.exception is not None and error is None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, error, result.output


def _file_run_args(out, model, task, *extra):
    """``ftlab train`` overrides of a 2-step LoRA run on the cue task file."""
    return [f"output_dir={out}", f"model={model}", f"data.task={task}", "data.template={text} It was",
            "data.options=[' terrible', ' great']", "data.n_train=16", "data.n_dev=0", "data.n_test=0",
            "steps=2", "batch_size=4", "eval_every=0", "lr=1e-3", "mode=lora", "lora.r=2", *extra]


# -- user files deleted ---------------------------------------------------------------------


def test_overwrite_keeps_a_user_file_in_a_folder_named_like_ftlabs(tmp_path):
    """`mkdir -p u/x/checkpoint; echo mine > u/x/checkpoint/w.bin; ftlab train --overwrite output_dir=u/x`"""
    user = tmp_path / "u" / "x"
    (user / "checkpoint").mkdir(parents=True)
    (user / "checkpoint" / "w.bin").write_text("mine")
    with pytest.raises(FtlabError, match=f"has no {MARKER}") as e:
        overwrite_dir(user, "train")
    assert _one_line(e.value) and (user / "checkpoint" / "w.bin").read_text() == "mine"


def test_overwrite_keeps_a_config_and_model_folder_of_the_user(tmp_path):
    user = tmp_path / "mine"
    (user / "model").mkdir(parents=True)
    (user / "config.json").write_text('{"mine": true}')
    (user / "model" / "weights.bin").write_text("mine")
    before = _files(user)
    with pytest.raises(FtlabError, match="ftlab never deletes it") as e:
        overwrite_dir(user, "train")
    assert _one_line(e.value) and _files(user) == before
    # Marked by a command that took it for an old ftlab folder, it is still not ftlab's to delete.
    claim_dir(user, "train")
    assert read_marker(user)["adopted"] == ["config.json", "model"]
    with pytest.raises(FtlabError, match="held config.json, model before ftlab marked it") as e:
        overwrite_dir(user, "train")
    assert _one_line(e.value) and {k: v for k, v in _files(user).items() if k != MARKER} == before


def test_overwrite_and_replay_output_keep_hidden_user_files(tmp_path):
    user = tmp_path / "hidden"
    user.mkdir()
    (user / ".a.tmp").write_text("mine a")
    (user / ".b.old").write_text("mine b")
    before = _files(user)
    assert not overwrite_dir(user, "train")  # nothing of ftlab's to delete
    assert _files(user) == before
    for overwrite in (False, True):
        with pytest.raises(FtlabError, match=r"holds \.a\.tmp, which ftlab did not write") as e:
            with new_dir(user, "replay", overwrite=overwrite) as tmp:
                (tmp / "weights").write_text("new")
        assert _one_line(e.value) and _files(user) == before


def test_overwrite_refuses_a_marked_folder_holding_a_user_file(tmp_path, tiny_model_factory, tiny_tokenizer):
    run = tmp_path / "run"
    _tiny_train(tiny_run_cfg(run), tiny_model_factory, tiny_tokenizer)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FtlabError, match="holds notes.txt, which ftlab does not write into a train folder") as e:
        overwrite_dir(run, "train")
    assert _one_line(e.value) and (run / "notes.txt").read_text() == "mine" and (run / "results.json").exists()
    (run / "notes.txt").unlink()
    assert overwrite_dir(run, "train") and not run.exists()  # ftlab's own files only: replaced


def test_replay_output_lists_what_it_wrote_and_keeps_a_file_added_since(tmp_path):
    out = tmp_path / "replayed"
    with new_dir(out, "replay") as tmp:
        (tmp / "adapter_model.safetensors").write_text("v1")
    assert read_marker(out)["entries"] == ["adapter_model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FtlabError, match="holds notes.txt"):
        with new_dir(out, "replay", overwrite=True) as tmp:
            (tmp / "adapter_model.safetensors").write_text("v2")
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").read_text() == "v1"


def test_train_overwrite_checks_every_input_before_deleting_the_run(tmp_path, tiny_model_dir, cue_task):  # noqa: F811
    run = tmp_path / "run"
    code, error, output = _cli("train", *_file_run_args(run, tiny_model_dir, cue_task))
    assert code == 0, output
    finished = _files(run)
    assert "results.json" in finished
    for typo, field in [(f"data.task={tmp_path / 'cue.jsnol'}", "cue.jsnol"),
                        (f"model={tmp_path / 'no-model'}", "no-model"), ("device=cuda:7", "cuda:7")]:
        code, error, output = _cli("train", *_file_run_args(run, tiny_model_dir, cue_task, typo), "--overwrite")
        assert code != 0 and error is not None and field in str(error) and _one_line(error), output
        assert _files(run) == finished  # the finished run is untouched
    code, error, output = _cli("train", *_file_run_args(run, tiny_model_dir, cue_task, "steps=3"), "--overwrite")
    assert code == 0, output
    assert json.loads((run / "results.json").read_text())["steps"] == 3


# -- checked too late -----------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [("device=foo", "device"), ("projection_dim=0", "projection_dim"),
                                             ("projection_dim=6", "projection_dim"), ("percentage=5", "percentage"),
                                             ("feature_dtype=int8", "feature_dtype"),
                                             ("warmup.percentage=2", "warmup.percentage"),
                                             ("warmup.epochs=0", "warmup.epochs"), ("top_k=0", "top_k")])
def test_select_settings_are_refused_when_loaded(override, field):
    from ftlab.select.pipeline import SelectConfig

    with pytest.raises(ConfigError) as e:
        load_config(SelectConfig, None, ["pool=[p.jsonl]", "targets=[t.jsonl]", override,
                                         *(["percentage=null"] if field == "top_k" else [])])
    assert f".{field}: must be" in str(e.value) and _one_line(e.value)


@pytest.mark.parametrize("command", ["warmup", "pipeline"])
def test_select_with_a_bad_device_writes_nothing(tmp_path, command):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "p0", "prompt": "hi", "response": "yo"}) + "\n")
    out = tmp_path / "less"
    code, error, output = _cli("select", command, f"pool=[{pool}]", f"targets=[{pool}]", f"output_dir={out}",
                               "device=foo")
    assert code != 0 and error is not None and "device" in str(error) and _one_line(error), output
    assert not out.exists()


def test_a_failed_start_leaves_no_folder_and_no_config(tmp_path, tiny_tokenizer, tiny_model_factory):
    fresh = tmp_path / "a" / "run"
    with pytest.raises(FtlabError, match="no-model"):
        train(tiny_run_cfg(fresh, f"model={tmp_path / 'no-model'}"), progress=False, data=tiny_run_data())
    assert not (tmp_path / "a").exists()  # the folders this call created are gone again
    with pytest.raises(FtlabError, match="missing.jsonl"):
        train(tiny_run_cfg(fresh, f"data.task={tmp_path / 'missing.jsonl'}", "data.template={text}",
                           "data.options=[' a', ' b']"), progress=False,
              model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer))
    assert not (tmp_path / "a").exists()
    kept = claim_dir(tmp_path / "kept", "train")  # a folder that was there: left, without a config.json
    with pytest.raises(FtlabError, match="no-model"):
        train(tiny_run_cfg(kept, f"model={tmp_path / 'no-model'}"), progress=False, data=tiny_run_data())
    assert sorted(p.name for p in kept.iterdir()) == [MARKER]


@pytest.fixture
def mezo_run(tmp_path, tiny_model_dir, cue_task):  # noqa: F811
    cfg = load_config(TrainConfig, None, [*_file_run_args(tmp_path / "run", tiny_model_dir, cue_task),
                                           "optimizer=mezo", "steps=3"])
    train(cfg, progress=False)
    return tmp_path / "run"


def test_replay_refuses_negative_steps(tmp_path, mezo_run):
    out = tmp_path / "replayed"
    code, error, output = _cli("replay", mezo_run, "--output", out, "--steps", "-3")
    assert code != 0 and error is not None and "steps" in str(error) and "-3" in str(error), output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".replayed")]


# -- others ---------------------------------------------------------------------------------


def test_one_run_folder_given_as_absolute_or_with_a_slash_resumes(tmp_path, monkeypatch, tiny_model_factory,
                                                                   tiny_tokenizer):
    monkeypatch.chdir(tmp_path)
    first = _tiny_train(tiny_run_cfg("runs/a"), tiny_model_factory, tiny_tokenizer)
    for name in (str(tmp_path / "runs" / "a"), "runs/a/", "./runs/a"):
        assert _tiny_train(tiny_run_cfg(name), tiny_model_factory, tiny_tokenizer) == first
    # Another folder is still another setting: a run's files moved under runs/b are not resumed as runs/b.
    (tmp_path / "runs" / "b").mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / "runs" / "a" / name).rename(tmp_path / "runs" / "b" / name)
    with pytest.raises(FtlabError, match="other settings.*output_dir"):
        _tiny_train(tiny_run_cfg("runs/b"), tiny_model_factory, tiny_tokenizer)


def test_a_deleted_checkpoint_state_restarts_the_log_too(tmp_path, tiny_model_factory, tiny_tokenizer, caplog):
    run = tmp_path / "run"
    cfg = tiny_run_cfg(run, "optimizer=mezo", "mode=lora", "lora.r=2", steps=4, eval_every=2, checkpoint_every=2)
    _tiny_train(cfg, tiny_model_factory, tiny_tokenizer)
    (run / "results.json").unlink()
    (run / "checkpoint" / "state.json").unlink()
    with caplog.at_level("WARNING", logger="ftlab"):
        _tiny_train(cfg, tiny_model_factory, tiny_tokenizer)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in records]
    assert sorted(keys) == sorted(set(keys))  # no step logged twice
    assert [s for split, s in keys if split == "dev"] == [0, 2, 4]
    assert [s for split, s in keys if split == "train"] == [1, 2, 3, 4]
    assert "no checkpoint to resume from" in caplog.text  # said, not silent


def test_overwrite_through_a_symlink_replaces_the_folder_and_leaves_no_lock(tmp_path, tiny_model_factory,
                                                                           tiny_tokenizer):
    real = tmp_path / "disk" / "run"
    _tiny_train(tiny_run_cfg(real), tiny_model_factory, tiny_tokenizer)
    link = tmp_path / "run"
    link.symlink_to(real, target_is_directory=True)
    assert overwrite_dir(link, "train")
    assert link.is_symlink() and real.is_dir() and not any(real.iterdir())  # emptied: no stale lock, no old run
    assert not [p for p in [*tmp_path.iterdir(), *real.parent.iterdir()] if "replaced" in p.name]
    _tiny_train(tiny_run_cfg(link), tiny_model_factory, tiny_tokenizer)
    assert (real / "results.json").exists() and not (real / LOCK).exists()


def test_eval_output_refuses_an_existing_file_without_overwrite(tmp_path, tiny_model_dir, cue_task):  # noqa: F811
    output = tmp_path / "eval.json"
    output.write_text("my earlier results")
    args = ["eval", "--model", tiny_model_dir, "--task", cue_task, "--template", "{text} It was",
            "--options", " terrible, great", "--n-test", "4", "--n-train", "4", "--output", output]
    code, error, out = _cli(*args)
    assert code != 0 and error is not None and "--overwrite" in str(error) and _one_line(error), out
    assert output.read_text() == "my earlier results"
    code, error, out = _cli(*args, "--overwrite")
    assert code == 0, out
    assert json.loads(output.read_text())["metrics"]["n"] == 4


def test_tint_eval_on_a_data_file_names_what_it_takes(tmp_path, tiny_model_dir, cue_task):  # noqa: F811
    out = tmp_path / "tint"
    code, error, output = _cli("tint", "eval", f"tasks=[{cue_task}]", f"model={tiny_model_dir}",
                               f"output_dir={out}")
    assert code != 0 and error is not None and _one_line(error), output
    assert "--template" not in str(error) and "built-in" in str(error) and "tasks" in str(error)
    assert not out.exists()

