"""A new user's path through ``ftlab train`` (issue 28): own JSONL data on a wheel install
without the plot extra, run folders named from the config, and what a missing model says."""

from __future__ import annotations

import ast
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
