"""``ftlab probe run`` on a tiny saved model and a task file: the table, the files, a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from ftlab.cli.probe import app


def test_probe_run_then_a_multi_token_word_is_a_one_line_error(tmp_path, tiny_model, tiny_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    rows = [{"text": f"the movie was {'great' if i % 2 else 'bad'} and the plot", "label": i % 2} for i in range(30)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"model={model_dir}", f"task={tmp_path / 't.jsonl'}", "template={text} It was",
            "options=[' bad', ' great']", "n_train=14", "n_dev=6", "n_test=10", "k=[0, 2]", "grid=[1.0]",
            f"output_dir={tmp_path / 'out'}"]
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Phi p_f(s)" in result.output and "zero-shot (label words)" in result.output
    assert (tmp_path / "out" / "results.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "ftlab.cli", "probe", "run", *args,
                          "words=[' great', ' not good at all']"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: word ' not good at all' is")
    assert len(bad.stderr.strip().splitlines()) == 1
