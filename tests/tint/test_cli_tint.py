"""``ftlab tint build`` on tiny saved models: the table and JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from ftlab.cli.tint import app


def test_build_prints_costs_and_the_check(tmp_path, tiny_model, tiny_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "build.json"
    result = CliRunner().invoke(app, ["build", f"model={model_dir}", "tint.n_prefixes=8", "tint.k=2", "n_tokens=24",
                                      "n_train=16", "repeats=1", "--output", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "TinT (H=" in result.output and "same argmax: True" in result.output
    data = json.loads(out.read_text())
    assert data["check"]["max_abs_diff"] < 1e-4 * data["check"]["logit_scale"]
    assert data["tint"]["prefix_tokens"] == 2 * 7 * 8
    assert data["tint"]["hidden_size"] == 128 * 64 // 8  # gate: 16 rows of 64 per prefix


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model, tiny_model_factory, tiny_tokenizer):
    from ftlab.errors import FtlabError

    model_dir = tmp_path / "llama"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    for args, start in [(["tint.hidden_size=10", "tint.n_prefixes=8"], "tint.hidden_size=10 cannot hold"),
                        (["n_train=0"], "tint build config.n_train")]:
        result = CliRunner().invoke(app, ["build", f"model={model_dir}", *args])
        assert isinstance(result.exception, FtlabError) and str(result.exception).startswith(start), result.exception
    gpt2 = tmp_path / "gpt2"
    tiny_model_factory("gpt2").save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    bad = subprocess.run([sys.executable, "-m", "ftlab.cli", "tint", "build", f"model={gpt2}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().startswith("error: TinT cannot simulate this model") \
        and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_eval_config_resolves_with_overrides():
    result = CliRunner().invoke(app, ["eval", "-c", "tint-quick", "n_test=5", "lrs=[0.01, 0.1]", "--show-config"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "n_test: 5" in result.output and "- 0.1" in result.output and "tasks:\n- sentiment" in result.output
    bad = CliRunner().invoke(app, ["eval", "-c", "tint-quick", "losses=[tokens]"])
    assert "losses" in str(bad.exception)
