"""The package's shape, checked: modules import only downwards (the layers below), paper
packages never import each other, no module imports another's private name, and the training
loop stays short (that the config imports no torch: tests/test_config.py). Each check reads the source's import
statements (lazy ones inside functions included), so a violation names the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ftlab"

# Lowest first: a module may import from its own layer and the layers below, never above.
LAYERS: list[set[str]] = [
    {"errors", "io", "bootstrap", "memory", "collate", "config", "configs", "__init__"},  # no ftlab imports but these
    {"distributed", "rundir", "runs", "plots", "reporting", "models", "tasks",
     "grads"},  # processes, folders, metrics' mirrors, models, data
    {"objectives", "evaluate"},  # what a forward computes
    {"zo", "local_sgd", "optim"},  # optimizers and their building blocks
    {"checkpoint"},  # the loop's resumable state
    {"parallel"},  # the loop's strategies
    {"train"},  # the loop
    {"select", "kernel", "tint", "probe", "seeds", "scaling", "integrations", "demo"},  # recipes on the loop
    {"cli"},  # the thin command line
]
PAPER_PACKAGES = {"zo", "select", "kernel", "tint", "probe", "seeds", "scaling"}


def _layer(top: str) -> int:
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"ftlab.{top} is in no layer of tests/test_architecture.py: add it")


def _imports():
    """(file, line, importing top-level name, imported module, imported names) of every ftlab import."""
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        top = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.split(".")[0] == "ftlab":
                yield rel, node.lineno, top, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "ftlab":
                        yield rel, node.lineno, top, alias.name, []


def _target(module: str, names: list[str]) -> str:
    parts = module.split(".")
    if len(parts) > 1:
        return parts[1]
    return names[0] if names and names[0] != "__version__" else "__init__"  # from ftlab import x


def test_every_module_imports_only_its_own_layer_or_below():
    upward = [f"{rel}:{line}: {top} (layer {_layer(top)}) imports {module} (layer {_layer(_target(module, names))})"
              for rel, line, top, module, names in _imports()
              if _layer(_target(module, names)) > _layer(top)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_paper_packages_share_code_through_common_modules_only():
    crossing = [f"{rel}:{line}: {top} imports {module}" for rel, line, top, module, names in _imports()
                if top in PAPER_PACKAGES and _target(module, names) in PAPER_PACKAGES - {top}]
    assert not crossing, "paper packages importing each other:\n" + "\n".join(crossing)


def test_no_module_imports_a_private_name_from_another():
    private = [f"{rel}:{line}: from {module} import {name}" for rel, line, _, module, names in _imports()
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_the_layers_checked_are_the_package_itself():
    """Every top-level module and package is placed in a layer (a new one must be placed)."""
    tops = {p.name.removesuffix(".py") for p in SRC.iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    for top in tops:
        _layer(top)


@pytest.mark.parametrize("function, limit", [("train", 60)])
def test_the_training_loop_reads_in_one_screen(function, limit):
    tree = ast.parse((SRC / "train.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    assert node.end_lineno - first + 1 < limit


def test_the_step_loop_asks_no_rank_or_mode():
    """Inside ``for step in ...`` of train(): no test of the rank, the world size, the optimizer's
    order, or a placement flag (the strategies answer those)."""
    tree = ast.parse((SRC / "train.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    loop = next(n for n in ast.walk(node) if isinstance(n, ast.For))
    names = {n.id for n in ast.walk(loop) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(loop) if isinstance(n, ast.Attribute)}
    asked = names & {"rank", "world", "main", "fsdp", "offload", "device_map", "local_sgd", "zeroth_order",
                     "is_zeroth_order", "dp"}
    assert not asked, f"the step loop asks {sorted(asked)}"
