"""``ftlab probe``: linear probes on f(s), Phi p_f(s) and p_f(s) on label words (Saunshi et al. 2021)."""

from __future__ import annotations

from typing import Optional

import typer

from ftlab.cli.common import ProgressBars, drawn, note_skipped_plots, resolved_config, table

app = typer.Typer(help="Linear probes on language-model features: f(s), the conditional mean Phi p_f(s), "
                       "p_f(s) on a word subset; zero-shot beside them, and how linear f(s) is in Phi p_f(s).",
                  no_args_is_help=True)



@app.callback()
def _group() -> None:
    """Linear probes on language-model features (Saunshi, Malladi, Arora, ICLR 2021)."""


@app.command("run")
def run_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key=value, e.g. task=trec 'k=[0,16]' "
                                                               "'kinds=[f,phi_p,layer]' 'words=[\" good\", \" bad\"]'"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a name in configs/ "
                                                                      "(e.g. probe-sentiment)."),
    overwrite: bool = typer.Option(False, help="Delete output_dir first (only a folder ftlab wrote), "
                                               "features included."),
    show_config: bool = typer.Option(False, help="Print the resolved config and exit."),
) -> None:
    """Extract features (resumable store in <output_dir>/features), fit the probes, write
    results.json / results.md / probe.png. Rerunning reuses every stored feature."""
    from ftlab.probe.experiment import KIND_NAMES, ProbeConfig, run_probe

    cfg = resolved_config(ProbeConfig, config, overrides, show=show_config,
                          overwrite_kind="probe" if overwrite else None)
    if cfg is None:
        return
    bars = ProgressBars()
    result = run_probe(cfg, progress=lambda split, n, total: bars(f"features {split}", n, total))
    bars.close()
    rows = [(str(s["k"] or "all"), KIND_NAMES[s["kind"]], f"{s['mean']:.3f}", f"{s['std']:.3f}", str(s["seeds"]))
            for s in result["summary"]]
    theory = result.get("theory", {})
    if "zero_shot" in theory:
        rows.append(("-", "zero-shot (label words)", f"{theory['zero_shot']['accuracy']:.3f}", "", ""))
    typer.echo(table(rows, ("k per class", "feature", "test accuracy", "std", "seeds")))
    if theory:
        typer.echo(f"R^2 of f(s) from Phi p_f(s), held out: {theory['r2_f_from_phi_p']:.3f}")
    typer.echo(", ".join([f"results in {cfg.output_dir}/results.json", "results.md", *drawn("probe.png")]))
    note_skipped_plots()
