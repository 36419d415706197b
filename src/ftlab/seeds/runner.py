"""Seed studies: a grid of otherwise identical fine-tuning runs that differ in their seeds.

The grid varies one seed kind at a time (``order``: batch order and dropout; ``init``: new
parameters such as LoRA or prefix; ``zo``: MeZO's perturbations), every other kind staying at the
base value 0, and, in the ``all`` group, every kind at once. Runs are named by their seeds
(``order3-init0-zo0``), so the base run is shared by every group and trained once. The train/dev
split (``seed``) and the test set (``data.data_seed``) are the same for every run.

Folder of a study::

    study.json             the study config (a rerun with another config refuses to continue)
    runs/<name>/           one ftlab training run (see :mod:`ftlab.train`) plus
    runs/<name>/seed_run.json  its seeds, dev score and per-example test scores (marks it done),
                           and per-example scores on each out-of-distribution task (``ood``)
    results.json           all runs' records, written once every run is done

Every run is tested with the weights its ``model/`` keeps (``train.keep``: the final ones, or
with ``keep: best`` those of its best dev evaluation, as the packaged seed studies set).
Out-of-distribution tests (``ood_tasks``: built-in task names or files) are evaluated on every
run's kept model beside the test set, on a subset of ``ood_n_test`` examples drawn with
``data.data_seed`` (the same for every run). An OOD task must use the study's label words (a
model trained to answer " Yes"/" No" is scored on those words); files are read with the study's
template and label words. A finished run missing an OOD task (added later) is evaluated on it
without retraining.

Resumable: a run with ``seed_run.json`` is never redone; a killed run resumes from its checkpoint.
Under ``torchrun`` rank ``r`` of ``w`` takes runs ``r::w``, each trained by that process alone,
then the ranks meet at a barrier and rank 0 writes ``results.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ftlab import objectives
from ftlab.config import ConfigError, Settings, TrainConfig, at_least, from_dict, needs, setting, to_dict
from ftlab.distributed import barrier, init_from_env
from ftlab.errors import FtlabError
from ftlab.evaluate import evaluate
from ftlab.io import atomic_write_json
from ftlab.models import load_trained
from ftlab.optim import is_zeroth_order
from ftlab.rundir import RunDir
from ftlab.runs import writes_run_dir
from ftlab.tasks import Example, Splits, TaskSpec, get_spec, load_task, make_splits
from ftlab.tasks.registry import is_builtin
from ftlab.train import RunData, load_run_data, train

SEED_KINDS: tuple[str, ...] = ("order", "init", "zo")
RUN_RECORD = "seed_run.json"


@needs(f"a non-empty list of distinct seed kinds among {list(SEED_KINDS)}")
def _seed_kinds(kinds: list[str]) -> bool:
    return bool(kinds) and all(k in SEED_KINDS for k in kinds) and len(set(kinds)) == len(kinds)


@dataclass
class SeedStudyConfig(Settings):
    """A seed study: the base training run and which seeds vary, how many runs per group."""

    train: TrainConfig = field(default_factory=TrainConfig)
    kinds: list[str] = setting(factory=lambda: ["order", "init"], check=_seed_kinds)
    runs_per_kind: int = 5  # seed values 0..n-1 of each kind (0 is the shared base run)
    runs_all: int = 5  # runs varying every kind at once (seeds s, s, s for s = 0..n-1)
    output_dir: str = "runs/seeds"
    # Out-of-distribution test tasks (built-in names or .jsonl/.csv files), each evaluated on
    # every run; ood_n_test examples of each (a subset drawn with data.data_seed; 0: all).
    ood_tasks: list[str] = field(default_factory=list)
    ood_n_test: int = setting(500, check=at_least(0), need=">= 0 (0: every example)")

    def check_combinations(self) -> None:
        if "zo" in self.kinds and not is_zeroth_order(self.train.optimizer):
            raise ConfigError("kinds", f"seed kind 'zo' needs a zeroth-order optimizer; {self.train.optimizer} has "
                                       "no perturbations (drop 'zo' from kinds, or use optimizer=mezo)")
        if self.runs_per_kind < 2 and self.runs_all < 2:
            raise ConfigError("", "a seed study needs runs_per_kind >= 2 or runs_all >= 2 to measure any variance")
        if len(set(self.ood_tasks)) != len(self.ood_tasks) or self.train.data.task in self.ood_tasks:
            raise ConfigError("ood_tasks", f"list distinct tasks other than the training task "
                                           f"{self.train.data.task!r} (got {self.ood_tasks!r})")


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: its seeds and the groups it belongs to."""

    seeds: tuple[tuple[str, int], ...]
    groups: tuple[str, ...]

    @property
    def name(self) -> str:
        return "-".join(f"{k}{v}" for k, v in self.seeds)


def plan_runs(study: SeedStudyConfig) -> list[RunSpec]:
    """The grid's distinct runs in a fixed order (deduplicated, with every group they serve)."""
    study.validate()
    kinds = study.kinds
    wanted: dict[tuple[tuple[str, int], ...], list[str]] = {}
    for kind in kinds:
        for value in range(study.runs_per_kind):
            wanted.setdefault(tuple((k, value if k == kind else 0) for k in kinds), []).append(kind)
    for value in range(study.runs_all):
        wanted.setdefault(tuple((k, value) for k in kinds), []).append("all")
    return [RunSpec(seeds, tuple(groups)) for seeds, groups in wanted.items()]


def ood_sets(study: SeedStudyConfig, spec: TaskSpec) -> dict[str, tuple[TaskSpec, list[Example]]]:
    """The study's out-of-distribution tests: task -> (spec, examples), checked to share the
    label words of ``spec`` (the study's task), each cut to ``ood_n_test`` examples drawn with
    ``data.data_seed``. Built-in tasks are checked before their data are read."""
    out = {}
    for task in study.ood_tasks:
        if is_builtin(task):
            ood_spec = get_spec(task)
            if ood_spec.kind != "classification" or ood_spec.options != spec.options:
                raise FtlabError(f"ood_tasks: {task!r} has label words {ood_spec.options!r} but the study's task "
                                 f"{spec.name!r} has {spec.options!r}; an OOD test must ask for the same words "
                                 "(pick a task variant with matching words, or set train.data.options)")
            ood_spec, examples = load_task(task)
        else:  # a file: read with the study's template and label words
            ood_spec, examples = load_task(task, template=spec.template, options=spec.options)
        n = len(examples) if study.ood_n_test == 0 else min(study.ood_n_test, len(examples))
        out[task] = (ood_spec, make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=n,
                                           data_seed=study.train.data.data_seed).test)
    return out


def study_train_config(study: SeedStudyConfig, run: RunSpec) -> TrainConfig:
    """The training config of one run: the base config with the run's seeds and folder."""
    seeds = {f"{k}_seed": v for k, v in run.seeds}
    return dataclasses.replace(study.train, **seeds,
                               output_dir=str(Path(study.output_dir) / "runs" / run.name))


def comparable_key(cfg: TrainConfig) -> dict[str, Any]:
    """What runs must share to be compared: the model and the task with its test set."""
    d = cfg.data
    return {"model": cfg.model, "task": d.task, "template": d.template, "options": d.options,
            "data_seed": d.data_seed, "n_test": d.n_test}


def check_comparable(configs: dict[str, TrainConfig]) -> None:
    """Raise :class:`FtlabError` unless every config (by name) has the same model and test set."""
    items = list(configs.items())
    first_name, first = items[0]
    for name, cfg in items[1:]:
        a, b = comparable_key(first), comparable_key(cfg)
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            raise FtlabError(f"runs disagree on {', '.join(diff)}: {first_name} has "
                             f"{', '.join(f'{k}={a[k]!r}' for k in diff)} but {name} has "
                             f"{', '.join(f'{k}={b[k]!r}' for k in diff)}; compare runs of one model and task")


def _prepare_study(study: SeedStudyConfig, main: bool) -> Path:
    """Create the study folder, or check that it holds a study of the same runs (only the
    number of runs may change: the grid grows or shrinks, finished runs are kept)."""
    out = Path(study.output_dir)
    path = out / "study.json"
    if path.exists():
        old = _stored_study(path)
        check_comparable({str(path): old.train, "this study": study.train})
        new, stored = _identity(to_dict(study)), _identity(to_dict(old))
        diff = [k for k in ("train", "kinds") if stored[k] != new[k]]
        if diff:
            raise FtlabError(f"{out} holds a seed study whose {' and '.join(diff)} differ; pass another "
                             "output_dir (or delete the folder to start afresh)")
    if main:
        atomic_write_json(path, to_dict(study))
    return out


def _identity(study: dict) -> dict:
    """A study config as JSON, without the train settings its runs do not use: each run gets its
    own output_dir (a study written before run folders were named from the config has
    "runs/default" there), and report_to only mirrors the metrics."""
    study = json.loads(json.dumps(study))
    study["train"] = {k: v for k, v in study["train"].items() if k not in ("output_dir", "report_to")}
    return study


def _stored_study(path: Path) -> SeedStudyConfig:
    """The config a study folder recorded. One started before ``train.keep`` existed tested its
    runs with their best dev step where they selected on dev: its ``keep`` is read as "best"."""
    stored = json.loads(path.read_text())
    old = from_dict(SeedStudyConfig, stored, str(path))
    t = old.train
    if isinstance(stored.get("train"), dict) and "keep" not in stored["train"] and t.eval_every and t.data.n_dev:
        old = dataclasses.replace(old, train=dataclasses.replace(t, keep="best"))
    return old


def use_rank_gpu(device: str) -> None:
    """Under ``torchrun`` with a ``cuda`` device, make this rank's GPU the current one: the ranks
    take the GPUs round-robin (``LOCAL_RANK`` modulo the GPUs), so with more ranks than GPUs small
    runs share one."""
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def join_ranks(device: str) -> tuple[int, int]:
    """``(rank, world)``: join the process group ``torchrun`` set up, through
    :func:`ftlab.distributed.init_from_env` (``(0, 1)`` in one process). The ranks of a study
    only meet at barriers (:func:`ftlab.distributed.barrier`): over NCCL for a ``cuda`` device
    when every rank of this host has a GPU of its own, over gloo when ranks share GPUs (see
    :func:`use_rank_gpu`), which NCCL refuses."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    shared = device.startswith("cuda") and local_world > torch.cuda.device_count()
    return init_from_env("cpu" if shared else device)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Hide torchrun's variables while a rank trains its own runs: ftlab.train must see a
    single process (it would otherwise join the group and split each batch over the ranks)."""
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@writes_run_dir("seeds", "study.output_dir")  # validates the study; rank 0 claims + locks
def run_study(study: SeedStudyConfig, *, progress: bool = True,
              on_run: Callable[[RunSpec, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate every run of the grid not done yet; returns all runs' records (on
    every rank). ``on_run(run, record)`` is called after each run this process finishes."""
    # The group is joined only once the runs are trained: ftlab.train must see one process.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    use_rank_gpu(study.train.device)
    runs = plan_runs(study)
    out = _prepare_study(study, rank == 0)
    data, ood = None, None
    with _single_process():
        for run in runs[rank::world]:
            path = out / "runs" / run.name / RUN_RECORD
            record = json.loads(path.read_text()) if path.exists() else None
            if record is not None and not study.ood_tasks:
                continue
            if data is None:
                data = load_run_data(study.train)
                ood = ood_sets(study, data.spec)
            if record is None:
                record = _run_one(study, run, data, ood, progress)
                if on_run:
                    on_run(run, record)
            elif _missing_ood(record, ood):
                _evaluate_ood(study_train_config(study, run), record, ood, path)
    if world > 1:
        join_ranks(study.train.device)
        barrier()  # every rank's records are on disk
    records = load_records(out)
    if rank == 0:
        atomic_write_json(out / "results.json", {"study": to_dict(study), "runs": records})
    return records


def _run_one(study: SeedStudyConfig, run: RunSpec, data: RunData, ood: dict[str, tuple[TaskSpec, list[Example]]],
             progress: bool) -> dict[str, Any]:
    """Train one run (resuming if it was cut), score its kept model (``model/``) on every test
    example and on every OOD example, and write ``seed_run.json``."""
    cfg = study_train_config(study, run)
    # The loop's own test evaluation keeps only the aggregate; the multi-bootstrap needs the
    # per-example scores, so the test set is scored here instead.
    results = train(cfg, progress=progress, data=RunData(data.spec, Splits(data.splits.train,
                                                                           data.splits.dev, [])))
    module, tokenizer = load_trained(cfg.model, RunDir(cfg.output_dir).model, dtype=cfg.dtype,
                                     device=cfg.device)
    test = evaluate(module, tokenizer, data.spec, data.splits.test, batch_size=cfg.eval_batch_size,
                    max_length=cfg.data.max_length, progress=False)
    record = {"name": run.name, "seeds": dict(run.seeds), "groups": list(run.groups),
              "mode": cfg.mode, "optimizer": cfg.optimizer, "best_dev": results["best_dev"],
              "best_step": results["best_step"], "test": test.metrics,
              "test_scores": example_scores(data.spec, data.splits.test, test.predictions),
              "ood": _ood_results(module, tokenizer, cfg, ood)}
    atomic_write_json(Path(cfg.output_dir) / RUN_RECORD, record)
    return record


def _missing_ood(record: dict[str, Any], ood: dict[str, tuple[TaskSpec, list[Example]]]) -> bool:
    """Whether ``record`` lacks an OOD task, or holds it for other examples (ood_n_test changed)."""
    have = record.get("ood", {})
    return any(task not in have or have[task]["ids"] != [ex.id for ex in examples]
               for task, (_, examples) in ood.items())


def _ood_results(module, tokenizer, cfg: TrainConfig, ood: dict[str, tuple[TaskSpec, list[Example]]]
                 ) -> dict[str, dict[str, Any]]:
    """Per OOD task: metrics, example ids and per-example scores (like the test set's)."""
    out = {}
    for task, (spec, examples) in ood.items():
        result = evaluate(module, tokenizer, spec, examples, batch_size=cfg.eval_batch_size,
                          max_length=cfg.data.max_length, progress=False)
        out[task] = {"metrics": result.metrics, "ids": [ex.id for ex in examples],
                     "scores": example_scores(spec, examples, result.predictions)}
    return out


def _evaluate_ood(cfg: TrainConfig, record: dict[str, Any], ood: dict[str, tuple[TaskSpec, list[Example]]],
                  path: Path) -> None:
    """Add the OOD results a finished run lacks to its record (no retraining)."""
    module, tokenizer = load_trained(cfg.model, RunDir(cfg.output_dir).model, dtype=cfg.dtype, device=cfg.device)
    missing = {t: v for t, v in ood.items() if _missing_ood(record, {t: v})}
    record["ood"] = {**record.get("ood", {}), **_ood_results(module, tokenizer, cfg, missing)}
    atomic_write_json(path, record)


def example_scores(spec: TaskSpec, examples: list[Example], predictions: list) -> list[float]:
    """Per-example test scores: 1/0 correctness (classification) or SQuAD F1 (generation)."""
    if spec.kind == "classification":
        return [float(p == ex.label) for p, ex in zip(predictions, examples)]
    return [objectives.best_over_answers(objectives.f1_score, p, ex.answers)
            for p, ex in zip(predictions, examples)]


def load_records(study_dir: str | Path) -> list[dict[str, Any]]:
    """The finished runs' records of a study folder, in name order."""
    return [json.loads(p.read_text()) for p in sorted(Path(study_dir).glob(f"runs/*/{RUN_RECORD}"))]


def load_study(study_dir: str | Path) -> SeedStudyConfig:
    """The config of the study in ``study_dir``."""
    path = Path(study_dir) / "study.json"
    if not path.exists():
        raise FtlabError(f"{path} not found: is {study_dir} a seed-study folder (ftlab seeds run)?")
    return from_dict(SeedStudyConfig, json.loads(path.read_text()), str(path))
