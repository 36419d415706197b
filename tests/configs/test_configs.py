"""The packaged configs: found by name from anywhere (a source checkout or a built wheel),
overridable by a path; a built wheel holds every one of them."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ftlab.cli.common import config_path
from ftlab.config import TrainConfig, load_config
from ftlab.configs import packaged_config, packaged_configs
from ftlab.errors import FtlabError

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ROOT / "src" / "ftlab" / "configs"


def test_every_packaged_config_is_found_by_name_and_is_valid_yaml():
    names = packaged_configs()
    assert names == sorted(p.stem for p in PACKAGED.glob("*.yaml")) and "sentiment-lora" in names
    for name in names:
        path = packaged_config(name)
        assert path.read_bytes() == (PACKAGED / f"{name}.yaml").read_bytes()
        assert isinstance(yaml.safe_load(path.read_text()), dict), name
    assert packaged_config("demo.yaml") == packaged_config("demo")
    assert packaged_config("no-such-config") is None and packaged_config("../configs/demo") is None


def _task_names(node):
    """Every task a config names: values of ``task`` and the lists ``tasks`` / ``ood_tasks``, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "task" and isinstance(value, str):
                yield value
            elif key in ("tasks", "ood_tasks") and isinstance(value, list):
                yield from value
            else:
                yield from _task_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _task_names(value)


def test_no_packaged_config_or_default_needs_a_big_bench_task():
    """What runs by default loads with no preparation: every task a packaged config or a config
    class's default names is built in and read from a default source (not the BIG-bench archive,
    which PyPI no longer serves)."""
    from ftlab.kernel.config import KernelConfig
    from ftlab.probe.experiment import ProbeConfig
    from ftlab.seeds import SeedStudyConfig
    from ftlab.tasks.registry import builtin_task, is_builtin
    from ftlab.tint.experiment import TintEvalConfig

    named = {f"{name}.yaml": list(_task_names(yaml.safe_load((PACKAGED / f"{name}.yaml").read_text())))
             for name in packaged_configs()}
    named["defaults"] = [TrainConfig().data.task, ProbeConfig().task, KernelConfig().task,
                         SeedStudyConfig().train.data.task, *TintEvalConfig().tasks]
    assert named["disflqa-lora.yaml"] == ["disflqa"] and named["tint-eval.yaml"] == ["sentiment", "trec",
                                                                                     "factual_summary"]
    assert named["seeds-sentiment-ood.yaml"] == ["sentiment_tweets", "sentiment_amazon", "sentiment_nyt", "sentiment"]
    for where, tasks in named.items():
        for task in tasks:
            assert is_builtin(task) and builtin_task(task).source is not None, f"{where}: {task}"


def test_a_path_overrides_a_packaged_name(tmp_path, monkeypatch):
    own = tmp_path / "sentiment-lora"  # a file named like a packaged config wins over it
    own.write_text("lr: 0.123\nmode: prefix\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(TrainConfig, config_path("sentiment-lora")).lr == 0.123
    assert load_config(TrainConfig, config_path(str(own))).mode == "prefix"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_config(TrainConfig, config_path("sentiment-lora")).mode == "lora"
    with pytest.raises(FtlabError, match="config file missing.yaml not found; .* packaged config: .*sentiment-lora"):
        config_path("missing.yaml")


def test_a_built_wheel_holds_the_configs_and_the_cli_finds_them_outside_the_checkout(tmp_path):
    """Builds the wheel from a copy of the sources (so the checkout gets no build/ folder),
    unpacks it (a pure-Python wheel installs by unpacking) and runs the CLI from it in a folder
    outside the checkout. ~10 s."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    import importlib.util

    # With setuptools at hand, build offline in this environment; else pip fetches it to build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *isolation,
                            "-q", "-w", str(tmp_path / "wheel")],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("ftlab-*.whl")
    with zipfile.ZipFile(wheel) as z:
        held = {Path(n).name for n in z.namelist() if n.startswith("ftlab/configs/")}
        z.extractall(tmp_path / "site")
    assert {p.name for p in PACKAGED.glob("*.yaml")} <= held
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = ("import sys, ftlab.cli; print(ftlab.cli.__file__); "
              "sys.argv = ['ftlab', 'train', '-c', 'sentiment-lora', 'lr=3e-4', '--show-config']; ftlab.cli.main()")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=outside, timeout=300,
                         check=False,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 0, run.stderr
    first, shown = run.stdout.split("\n", 1)
    assert first.startswith(str(tmp_path / "site"))  # the wheel's ftlab, not the checkout's
    cfg = yaml.safe_load(shown)
    assert (cfg["mode"], cfg["optimizer"], cfg["lr"], cfg["lora"]["r"]) == ("lora", "adamw", 0.0003, 8)
