"""``ftlab tint``: build a TinT from an inner model (size, cost, equality check) and evaluate
dynamic evaluation / TinT against zero-shot and in-context learning."""

from __future__ import annotations

from typing import Optional

import typer

from ftlab.cli.common import ProgressBars, drawn, note_skipped_plots, resolved_config, table

app = typer.Typer(help="TinT (Panigrahi et al., 2023): a transformer that simulates and fine-tunes an inner "
                       "Llama-style model in one forward pass.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Transformer in Transformer: build, check and evaluate."""


@app.command("build")
def build_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key=value, e.g. tint.k=2 "
                                                               "tint.n_prefixes=192 n_tokens=256"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged name "
                                                                      "(e.g. tint-build)."),
    output: Optional[str] = typer.Option(None, help="Also write the measurements as JSON to this file (a new "
                                                    "file, or an earlier build's with --overwrite)."),
    overwrite: bool = typer.Option(False, help="Replace --output if it holds an earlier build's JSON."),
    show_config: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Build a TinT from the model's weights, run one forward pass on a random context, check it
    against the reference step, and print parameters, peak memory and seconds beside the inner model's."""
    from ftlab.tint.costs import TintBuildConfig, check_output, measure, write_output

    cfg = resolved_config(TintBuildConfig, config, overrides, show=show_config)
    if cfg is None:
        return
    if output:
        check_output(output, overwrite)  # refused before the minutes of measuring, not after
    res = measure(cfg)
    t, i = res["tint"], res["inner"]
    rows = [("inner model", f"{i['parameters']:,}", "-", f"{i['peak_mib_growth']:.0f}", f"{i['seconds']:.3f}"),
            (f"TinT (H={t['hidden_size']}, {t['prefix_tokens']} prefix tokens)", f"{t['prefix'] + t['buffers']:,}",
             f"{t['dense_equivalent']:,}", f"{t['peak_mib_growth']:.0f}", f"{t['seconds']:.3f}")]
    typer.echo(table(rows, ("model", "parameters", "dense-equivalent", "peak MiB added", "s / forward")))
    c = res["check"]
    typer.echo(f"TinT vs reference step: max |logit diff| {c['max_abs_diff']:.2e} "
               f"(logits up to {c['logit_scale']:.1f}), same argmax: {c['same_argmax']}")
    if output:
        write_output(output, cfg, res, overwrite)


@app.command("eval")
def eval_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key=value, e.g. n_test=50 "
                                                               "'tasks=[sentiment]' 'lrs=[1e-4]'"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged name "
                                                                      "(e.g. tint-eval, tint-quick)."),
    overwrite: bool = typer.Option(False, help="Delete output_dir first (only a folder ftlab wrote)."),
    show_config: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Zero-shot, ICL, exact and approximate dynamic evaluation, and TinT, per task, with
    improvements over ICL and zero-shot (multi-bootstrap 95% intervals), and the
    language-modelling variant. Resumable: finished (task, seed) parts are kept."""
    from ftlab.errors import FtlabError
    from ftlab.runs import overwrite_dir
    from ftlab.tasks import is_builtin
    from ftlab.tint.experiment import TintEvalConfig, run_eval

    cfg = resolved_config(TintEvalConfig, config, overrides, show=show_config)
    if cfg is None:
        return
    for task in cfg.tasks:
        if not is_builtin(task):
            raise FtlabError(f"tasks: {task!r} is not a built-in task; tint eval runs built-in tasks only, with "
                             "their own templates and label words (see `ftlab data list`), e.g. 'tasks=[sentiment]'")
    if overwrite:
        overwrite_dir(cfg.output_dir, "tint")  # after the checks; only a folder ftlab wrote
    bars = ProgressBars(absolute=True)
    summary = run_eval(cfg, progress=bars)
    bars.close()
    for task, rows in summary["tasks"].items():
        typer.echo(f"\n{task}")
        typer.echo(table([(m, f"{r['accuracy']:.3f}",
                           _iv(r.get("vs_ICL")), _iv(r.get("vs_zero-shot"))) for m, r in rows.items()],
                         ("method", "accuracy", "vs ICL [95% CI]", "vs zero-shot [95% CI]")))
    if "lm" in summary:
        typer.echo("\nlanguage modelling (second half)")
        typer.echo(table([(m, f"{r['perplexity']:.2f}", _iv(r.get("vs_base_loss"), 4))
                          for m, r in summary["lm"].items()],
                         ("method", "perplexity", "loss vs base [95% CI]")))
    checks = [row for rows in summary["tint_check"].values() for row in rows]
    if checks:
        typer.echo(f"\nTinT forward on {len(checks)} queries: max |logit diff| vs approx "
                   f"{max(r['max_abs_diff'] for r in checks):.2e}, same prediction "
                   f"{sum(r['same_prediction'] for r in checks)}/{len(checks)}")
    typer.echo(", ".join([f"\nwritten: {cfg.output_dir}/summary.json", "report.md", *drawn("tint_eval.png")]))
    note_skipped_plots()


def _iv(d: Optional[dict], digits: int = 3) -> str:
    if not d:
        return ""
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"
