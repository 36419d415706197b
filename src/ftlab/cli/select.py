"""``ftlab select``: LESS targeted data selection and its baselines (a thin shell over
:mod:`ftlab.select.pipeline`). Every command resumes what a killed run left."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ftlab.cli.common import config_path, drawn, note_skipped_plots, table

DEFAULT_TARGETS = ("exams-qa", "lexicon", "sarcasm")  # ftlab.select.pool.DEFAULT_TARGET_FAMILIES (imported late)

app = typer.Typer(help="Targeted data selection (LESS) from low-rank gradient features, and baselines.",
                  no_args_is_help=True)

CONFIG = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged config's name "
                                                   "(e.g. less-smollm2).")
OVERRIDES = typer.Argument(None, help="Config overrides as key=value, e.g. percentage=0.1 warmup.epochs=2 "
                                      "'pool=[a.jsonl,b.jsonl]'")


def _config(config: Optional[str], overrides: Optional[list[str]], extra: list[str] = ()) -> Any:
    from ftlab.config import load_config
    from ftlab.select.pipeline import SelectConfig, check_config

    cfg = load_config(SelectConfig, config_path(config), [*(overrides or []), *extra])
    check_config(cfg)
    return cfg


def _claimed(cfg: Any) -> Any:
    """Claim and lock the output folder for a stage (rank 0 under torchrun; see ftlab.runs)."""
    from ftlab.runs import claim_and_lock

    return claim_and_lock(cfg.output_dir, "select")


def _data(cfg: Any) -> tuple[list, list]:
    from ftlab.select.data import load_instructions

    return load_instructions(cfg.pool), load_instructions(cfg.targets) if cfg.targets else []


def _report(cfg: Any, summary: dict) -> None:
    rows = [(family, str(n)) for family, n in summary["families"].items()]
    typer.echo(table(rows, ("source family", "selected")))
    if summary["skipped_no_target_tokens"]:
        typer.echo(f"skipped {len(summary['skipped_no_target_tokens'])} examples without response tokens "
                   f"(listed in summary.json)", err=True)
    out = Path(cfg.output_dir)
    files = [out / "selected.jsonl", out / "scores.csv", *drawn(out / "selection.png")]
    typer.echo(f"selected {summary['n_selected']} of {summary['n_scored']} scored examples ({cfg.method}): "
               f"{', '.join(map(str, files))}")
    note_skipped_plots()


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@app.command("prepare-pool")
def prepare_pool(
    out: Path = typer.Option(Path("data/less"), help="Folder for pool.jsonl, targets/<family>.jsonl and "
                                                     "manifest.json (files ftlab wrote there are replaced, "
                                                     "no others)."),
    targets: str = typer.Option(",".join(DEFAULT_TARGETS), help="Target families, comma-separated: held out "
                                                               "of the pool, each gets targets/<family>.jsonl."),
    per_task: int = typer.Option(40, help="Pool examples per registry task (folder) of the other families."),
    n_target: int = typer.Option(4, help="Target examples per task of a target family."),
    max_chars: int = typer.Option(1000, help="Skip examples longer than this (messages + response)."),
    exclude: Optional[str] = typer.Option(None, help="Registry folders to leave out, comma-separated "
                                                     "(default: those ftlab's built-in tasks read, corr2cause)."),
    scan: int = typer.Option(1000, help="Rows parsed per task at most: a uniform sample of its lines."),
    seed: int = typer.Option(0),
    archive: Optional[Path] = typer.Option(None, help="A local copy of the evals wheel to use (checked against "
                                                      "its pinned sha256) instead of downloading it."),
) -> None:
    """Build the instruction pool and held-out target sets from the registry data of the pinned
    evals==3.0.1.post1 wheel (OpenAI evals; fetched from PyPI and sha256-checked on first use,
    read without extracting it). The data sets its LICENSE.md puts under other licences are
    left out; the target families never appear in the pool."""
    from ftlab.errors import FtlabError
    from ftlab.select.pool import PoolSpec, build_evals_pool
    from ftlab.tasks import sources

    if archive is not None and (given := sources.add_archive(archive)) != sources.EVALS:
        raise FtlabError(f"{archive} is {given.requirement}'s artefact, not {sources.EVALS.requirement}'s")
    spec = PoolSpec(per_task=per_task, n_target=n_target, max_chars=max_chars, target_families=_names(targets),
                    scan=scan, seed=seed)
    if exclude is not None:
        spec.exclude_tasks = _names(exclude)
    built = build_evals_pool(out, spec, progress=True)
    files, counts = built.manifest["files"], built.manifest.get("counts", {})
    rows = [(name, str(path), str(files[str(path.relative_to(out))]["rows"]))
            for name, path in [("pool", built.pool), *built.targets.items()]]
    typer.echo(table(rows, ("set", "file", "examples")))
    if built.reused:
        typer.echo(f"kept the files of an identical earlier build ({out / 'manifest.json'})")
    else:
        typer.echo(f"{counts['tasks_kept']} of {counts['tasks_in_registry']} registry tasks used "
                   f"({counts['pool_families']} pool families); excluded by the wheel's LICENSE.md: "
                   f"{', '.join(counts['licence_excluded']) or 'none'}; left out: "
                   f"{', '.join(counts['spec_excluded']) or 'none'}; without usable rows: "
                   f"{len(counts['tasks_without_usable_rows'])}; {built.seconds:.1f} s")


@app.command("warmup")
def warmup_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG) -> None:
    """LESS step 1: LoRA warm-up on a random p% of the pool, a checkpoint (with AdamW state by
    parameter name) per epoch in <output_dir>/warmup."""
    from ftlab.select.pipeline import load_lora_model
    from ftlab.select.warmup import run_warmup

    cfg = _config(config, overrides)
    with _claimed(cfg):
        pool, _ = _data(cfg)
        module, tokenizer = load_lora_model(cfg)
        ckpts = run_warmup(module, tokenizer, pool, cfg.warmup, Path(cfg.output_dir) / "warmup",
                           max_length=cfg.max_length)
    typer.echo(table([(str(c.epoch), f"{c.mean_lr:.3g}", str(c.path)) for c in ckpts],
                     ("epoch", "mean lr", "checkpoint")))


@app.command("features")
def features_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG) -> None:
    """LESS steps 2-3: projected Adam features of the pool and SGD features of the targets at
    every warm-up checkpoint, into datastores under <output_dir>/features (under torchrun the
    examples are split over the processes)."""
    from ftlab.select.pipeline import checkpoints_of, gradient_features, load_lora_model

    cfg = _config(config, overrides)
    with _claimed(cfg):
        pool, targets = _data(cfg)
        ckpts = checkpoints_of(cfg)
        module, tokenizer = load_lora_model(cfg)
        train = gradient_features(cfg, module, tokenizer, pool, ckpts, "adam", "train")
        target = gradient_features(cfg, module, tokenizer, targets, ckpts, "sgd", "target")
    rows = [(s.manifest.checkpoint, s.manifest.grad_type, str(len(s)), str(s.path))
            for s in train.stores + target.stores]
    typer.echo(table(rows, ("checkpoint", "type", "rows", "datastore")))
    skipped = train.skipped + target.skipped
    if skipped:
        typer.echo(f"skipped {len(skipped)} examples without response tokens, e.g. {skipped[0]}", err=True)


@app.command("score")
def score_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG) -> None:
    """LESS steps 4-5: stream the stored features into scores, select the top examples, write
    selected.jsonl, scores.csv, selected_data.jsonl and selection.png."""
    from ftlab.select.pipeline import less_from_stores, stored_features, write_outputs

    cfg = _config(config, overrides)
    with _claimed(cfg):
        pool, targets = _data(cfg)
        ids, scores = less_from_stores(cfg, stored_features(cfg, "train"), stored_features(cfg, "target"), targets)
        summary = write_outputs(cfg, pool, ids, scores, [])
    _report(cfg, summary)


@app.command("pipeline")
def pipeline_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG) -> None:
    """The whole recipe of the config's method (less: warm-up -> features -> scores -> top-k)."""
    from ftlab.select.pipeline import run_pipeline

    cfg = _config(config, overrides)
    summary = run_pipeline(cfg)
    if summary:  # empty on ranks other than 0 under torchrun
        _report(cfg, summary)


@app.command("baseline")
def baseline_cmd(
    method: str = typer.Argument(..., help="random or representation (mean-pooled last hidden states, cosine)."),
    overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG,
) -> None:
    """A baseline selection with the same inputs and outputs as LESS."""
    from ftlab.errors import FtlabError
    from ftlab.select.pipeline import run_pipeline

    if method not in ("random", "representation"):
        raise FtlabError(f"unknown baseline {method!r}; choose random or representation")
    cfg = _config(config, overrides, [f"method={method}"])
    _report(cfg, run_pipeline(cfg))
