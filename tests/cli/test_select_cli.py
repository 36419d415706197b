"""``ftlab select``: the staged LESS commands on a tiny saved model, a baseline, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ftlab.cli.select import app
from ftlab.errors import FtlabError


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
