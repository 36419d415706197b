"""``ftlab select``: the staged LESS commands on a tiny saved model, a baseline, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ftlab.cli.select import app
from ftlab.errors import FtlabError
from ftlab.io import file_sha256


def _rows(prompt: str, answers: list[str], family: str, n: int) -> list[dict]:
    return [{"prompt": prompt.format(w=["great", "bad"][i % 2]), "response": answers[i % len(answers)],
             "task": f"{family}-{i % 2}", "family": family} for i in range(n)]


@pytest.fixture
def setup(tmp_path, tiny_model, tiny_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    pool = _rows("Review: the movie was {w}. Sentiment:", [" positive", " negative"], "sentiment", 10) + \
        _rows("Question: is the story {w}? Answer:", [" yes", " no"], "qa", 10)
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    target = _rows("Question: is the plot {w}? Answer:", [" no", " yes"], "qa", 2)
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target))
    return [f"model={model_dir}", f"pool=[{tmp_path / 'pool.jsonl'}]", f"targets=[{tmp_path / 'target.jsonl'}]",
            f"output_dir={tmp_path / 'run'}", "projection_dim=64", "max_length=32", "percentage=0.25",
            "lora.r=2", "warmup.percentage=0.5", "warmup.epochs=2", "warmup.lr=1e-3", "warmup.batch_size=5"]


def test_staged_commands_then_baseline(tmp_path, setup):
    runner = CliRunner()
    for command in ("warmup", "features", "score"):
        result = runner.invoke(app, [command, *setup])
        assert result.exit_code == 0, (command, result.output, result.exception)
    assert (tmp_path / "run" / "warmup" / "epoch-2" / "adam.safetensors").is_file()
    assert len(list((tmp_path / "run" / "features" / "train").iterdir())) == 2
    selected = [json.loads(line) for line in (tmp_path / "run" / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 5 and [s["rank"] for s in selected] == [1, 2, 3, 4, 5]
    assert all(s["source"] == str(tmp_path / "pool.jsonl") for s in selected)
    assert "source family" in result.output and (tmp_path / "run" / "selection.png").is_file()
    result = runner.invoke(app, ["baseline", "random", *setup[:-4], f"output_dir={tmp_path / 'random'}"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "random" / "selected.jsonl").read_text().splitlines()) == 5


def test_bad_input_is_a_one_line_error(tmp_path, setup):
    result = subprocess.run([sys.executable, "-m", "ftlab.cli", "select", "score", *setup],  # nothing computed yet
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no warm-up checkpoints" in lines[0], result.stderr


@pytest.mark.parametrize("args, message", [(["pipeline", "targets=[]"], "target set is empty"),
                                           (["baseline", "magic"], "unknown baseline"),
                                           (["pipeline", "method=magic"], "unknown selection method")])
def test_bad_config_raises_ftlab_error(setup, args, message):
    result = CliRunner().invoke(app, [args[0], *args[1:], *setup] if args[0] == "baseline"
                                else [args[0], *setup, *args[1:]])
    assert isinstance(result.exception, FtlabError) and message in str(result.exception)


def test_prepare_pool_on_a_fake_evals_wheel(tmp_path, monkeypatch):
    """prepare-pool end to end on a small evals-like wheel standing in for the pinned one."""
    import zipfile

    import ftlab.tasks.sources as sources
    from ftlab.cli.select import DEFAULT_TARGETS
    from ftlab.select.data import load_instructions
    from ftlab.select.pool import DEFAULT_TARGET_FAMILIES

    assert DEFAULT_TARGETS == DEFAULT_TARGET_FAMILIES
    chat = lambda task, i: {"input": [{"role": "system", "content": task}, {"role": "user", "content": f"q{i}"}],  # noqa: E731
                            "ideal": f"a{i}"}
    wheel = tmp_path / "evals-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("evals-0.0.2.dist-info/LICENSE.md", "- **Location**: evals/registry/data/closed\n")
        for task in ("french-lexicon", "dutch-lexicon", "algebra", "trivia", "closed"):
            zf.writestr(f"evals/registry/data/{task}/samples.jsonl",
                        "".join(json.dumps(chat(task, i)) + "\n" for i in range(6)))
    fake = sources.Source("evals", "0.0.2", wheel.name, file_sha256(wheel), wheel.stat().st_size, "test")
    monkeypatch.setattr(sources, "EVALS", fake)
    monkeypatch.setattr(sources, "SOURCES", (fake,))  # --archive recognises it by its sha256
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FTLAB_ARCHIVES", raising=False)
    out = tmp_path / "less"
    args = ["prepare-pool", "--out", str(out), "--targets", "lexicon", "--per-task", "3", "--n-target", "2",
            "--archive", str(wheel)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "excluded by the wheel's LICENSE.md: closed" in result.output
    assert "4 of 5 registry tasks used (2 pool families)" in result.output
    pool, target = load_instructions([out / "pool.jsonl"]), load_instructions([out / "targets" / "lexicon.jsonl"])
    assert sorted(ex.task for ex in pool) == ["algebra"] * 3 + ["trivia"] * 3
    assert sorted(ex.task for ex in target) == ["dutch-lexicon"] * 2 + ["french-lexicon"] * 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "kept the files of an identical earlier build" in again.output
    result = CliRunner().invoke(app, [*args[:4], "lexcon"])
    assert isinstance(result.exception, FtlabError) and "did you mean lexicon" in str(result.exception)
