"""``ftlab probe``: features of a model on a task, linear probes per feature kind and per k, the
zero-shot baseline, and the theory check (how linearly ``f(s)`` follows from ``Phi p_f(s)``).

The output folder (an ftlab run folder of kind ``probe``) holds ``features/`` (the resumable
store), ``results.json``, ``results.md`` and ``probe.png``. Rerunning the same command reuses
every stored feature; a folder of another model or split is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ftlab.config import Settings, above, at_least, every, needs, non_empty, setting
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json, atomic_write_text
from ftlab.probe.cache import split_features
from ftlab.probe.features import FeatureSpec, middle_layer, single_token_ids
from ftlab.probe.probes import C_GRID, fit_probe, linear_fit_r2, wilson_interval
from ftlab.probe.store import FeatureStore, model_fingerprint
from ftlab.runs import writes_run_dir
from ftlab.tasks import load_task, make_splits

KIND_NAMES = {"f": "f(s)", "phi_p": "Phi p_f(s)", "p_words": "p_f(s) on words", "layer": "f(s) mid layer"}


@needs(f"a non-empty list of distinct kinds among {list(KIND_NAMES)}")
def _known_kinds(kinds: list[str]) -> bool:
    return bool(kinds) and all(k in KIND_NAMES for k in kinds) and len(set(kinds)) == len(kinds)


@dataclass
class ProbeConfig(Settings):
    """One probing study: a model, a task, feature kinds, probe sizes ``k`` (0 = all ``n_train``
    training examples; else ``k`` per class, balanced, for each seed)."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    task: str = "sentiment"
    template: str | None = None
    options: list[str] | None = None
    kinds: list[str] = setting(factory=lambda: ["f", "phi_p", "p_words"], check=_known_kinds)
    words: list[str] | None = None  # p_words: these single-token words (None: the task's label words)
    # kind "layer": this block (None: the middle one)
    layer: int | None = setting(None, check=at_least(0), need=">= 0 (or null: the middle layer)")
    k: list[int] = setting(factory=lambda: [0, 16, 64], check=every(at_least(0)),
                              need="a non-empty list of sizes >= 0 (0: all training data)")
    seeds: list[int] = setting(factory=lambda: [0], check=non_empty, need="a non-empty list of seeds")
    n_train: int = setting(1000, check=at_least(1))
    n_dev: int = setting(100, check=at_least(0))
    n_test: int = setting(500, check=at_least(1))
    data_seed: int = 0
    grid: list[float] = setting(factory=lambda: list(C_GRID), check=every(above(0)),
                                need="a non-empty list of C values > 0")
    theory: bool = True  # zero-shot from p on the label words, and the R^2 of f(s) from Phi p_f(s)
    batch_size: int = setting(16, check=at_least(1))
    chunk_rows: int = setting(64, check=at_least(1))
    max_length: int = setting(128, check=at_least(2))
    output_dir: str = "runs/probe"


def _labels(examples) -> np.ndarray:
    return np.array([ex.label for ex in examples])


@writes_run_dir("probe", "cfg.output_dir")
def run_probe(cfg: ProbeConfig, *, model_and_tokenizer: tuple[Any, Any] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the study of ``cfg`` (see the module docstring); returns what ``results.json`` holds.
    ``progress(what, done, total)`` is called as features are computed."""
    spec, examples = load_task(cfg.task, template=cfg.template, options=cfg.options)
    if spec.kind != "classification":
        raise FtlabError(f"task {spec.name!r} is a generation task; probes need a classification task")
    if len({ex.label for ex in examples}) < 2:
        raise FtlabError(f"task {spec.name!r}: all examples have one class; a probe needs >= 2 classes")
    if model_and_tokenizer is None:
        from ftlab.models import load_model

        model_and_tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model, tokenizer = model_and_tokenizer
    words = cfg.words if cfg.words is not None else spec.options
    word_ids = single_token_ids(tokenizer, words) if ("p_words" in cfg.kinds or cfg.theory) else ()
    layer = cfg.layer if cfg.layer is not None else middle_layer(model)
    kinds = list(dict.fromkeys(cfg.kinds + (["f", "phi_p", "p_words"] if cfg.theory else [])))
    fspec = FeatureSpec(tuple(kinds), word_ids, layer if "layer" in kinds else None)
    out = Path(cfg.output_dir)
    store = FeatureStore(out / "features", cfg.model, model_fingerprint(model))

    def feats(name: str, exs) -> dict[str, np.ndarray]:
        report = (lambda n, total=len(exs): progress(name, n, total)) if progress else None
        return split_features(model, tokenizer, spec, exs, name, fspec, store, batch_size=cfg.batch_size,
                              chunk_rows=cfg.chunk_rows, max_length=cfg.max_length, progress=report)

    base = make_splits(examples, seed=cfg.seeds[0], n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test,
                       data_seed=cfg.data_seed)
    test = base.test
    x_test = feats("test", test)
    y_test = _labels(test)
    x_train, y_train = feats("train", base.train), _labels(base.train)
    x_dev, y_dev = (feats("dev", base.dev), _labels(base.dev)) if base.dev else (None, None)
    rows: list[dict[str, Any]] = []
    for k in cfg.k:
        for seed in (cfg.seeds if k else cfg.seeds[:1]):
            # k per class: a seeded balanced draw from the training split (and at most k per class
            # from dev), so the stored features serve every k and seed without another forward pass.
            tr = balanced_rows(y_train, k, seed, "train") if k else np.arange(len(y_train))
            dv = None if y_dev is None else (balanced_rows(y_dev, k, seed, "dev", at_most=True) if k
                                             else np.arange(len(y_dev)))
            for kind in cfg.kinds:
                r = fit_probe(x_train[kind][tr], y_train[tr], x_test[kind], y_test,
                              None if dv is None else x_dev[kind][dv], None if dv is None else y_dev[dv],
                              grid=cfg.grid, seed=seed)
                rows.append({"k": k, "seed": seed, "kind": kind, **r.summary()})
    result: dict[str, Any] = {"model": cfg.model, "task": spec.name, "template": spec.template,
                              "words": list(words), "layer": layer if "layer" in kinds else None,
                              "splits": {"train": len(base.train), "dev": len(base.dev), "test": len(test),
                                         "note": base.note},
                              "rows": rows, "summary": summarise(rows)}
    if cfg.theory:
        result["theory"] = theory_check(x_train, x_dev, x_test, y_test, words, spec.options)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", markdown(result))
    _plot(result, out / "probe.png")
    return result


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std and range of test accuracy over seeds, per (k, kind)."""
    groups: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["k"], r["kind"]), []).append(r["accuracy"])
    return [{"k": k, "kind": kind, "mean": float(np.mean(a)), "std": float(np.std(a)), "min": min(a),
             "max": max(a), "seeds": len(a)} for (k, kind), a in groups.items()]


def balanced_rows(labels: np.ndarray, k: int, seed: int, what: str, at_most: bool = False) -> np.ndarray:
    """Row indices of ``k`` examples of every class, drawn with ``seed`` (in row order); with
    ``at_most``, all of a class that has fewer."""
    rng = np.random.default_rng([seed, k])
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if at_most:
            picked.append(rng.choice(rows, min(k, len(rows)), replace=False))
            continue
        if len(rows) < k:
            raise FtlabError(f"k={k} per class: the {what} split has only {len(rows)} examples of class {c}; "
                             f"raise n_{what} or lower k")
        picked.append(rng.choice(rows, k, replace=False))
    return np.sort(np.concatenate(picked))


def theory_check(x_train: dict[str, np.ndarray], x_dev: dict[str, np.ndarray] | None,
                 x_test: dict[str, np.ndarray], y_test: np.ndarray, words: list[str],
                 options: list[str]) -> dict[str, Any]:
    """Zero-shot accuracy (argmax of p over the label words, when the words are the label words),
    and the held-out R^2 of ``f(s)`` regressed linearly on ``Phi p_f(s)`` (and back): fit on
    train, ridge chosen on dev, scored on test."""
    out: dict[str, Any] = {}
    if list(words) == list(options):
        pred = x_test["p_words"].argmax(1)
        correct = int((pred == y_test).sum())
        low, high = wilson_interval(correct, len(y_test))
        out["zero_shot"] = {"accuracy": correct / len(y_test), "ci_low": low, "ci_high": high,
                            "n_test": len(y_test)}
    for a, b in (("phi_p", "f"), ("f", "phi_p")):
        dev = (None, None) if x_dev is None else (x_dev[a], x_dev[b])
        r2, ridge = linear_fit_r2(x_train[a], x_train[b], x_test[a], x_test[b], *dev)
        out[f"r2_{b}_from_{a}"], out[f"ridge_{b}_from_{a}"] = r2, ridge
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Linear probes: {result['model']} on {result['task']}", "",
             f"template `{result['template']!r}`, words {result['words']}; splits {result['splits']}", "",
             "| k per class | feature | test accuracy (mean over seeds) | std | seeds |", "|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['k'] or 'all'} | {KIND_NAMES[s['kind']]} | {s['mean']:.3f} | {s['std']:.3f} | "
                     f"{s['seeds']} |")
    theory = result.get("theory", {})
    if "zero_shot" in theory:
        z = theory["zero_shot"]
        lines.append(f"| - | zero-shot (label words) | {z['accuracy']:.3f} "
                     f"[{z['ci_low']:.3f}, {z['ci_high']:.3f}] | | |")
    if theory:
        lines += ["", f"R^2 of f(s) from Phi p_f(s) (linear, held out): {theory['r2_f_from_phi_p']:.3f}; "
                      f"of Phi p_f(s) from f(s): {theory['r2_phi_p_from_f']:.3f}"]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is optional
        return
    from ftlab.io import atomic_path

    summary = result["summary"]
    ks = list(dict.fromkeys(s["k"] for s in summary))
    kinds = list(dict.fromkeys(s["kind"] for s in summary))
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(ks), 3.5))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        pts = [(i, s) for i, k in enumerate(ks) for s in summary if s["k"] == k and s["kind"] == kind]
        ax.bar([i + j * width for i, _ in pts], [s["mean"] for _, s in pts], width,
               yerr=[s["std"] for _, s in pts], label=KIND_NAMES[kind])
    zero = result.get("theory", {}).get("zero_shot")
    if zero:
        ax.axhline(zero["accuracy"], color="k", ls="--", lw=1, label="zero-shot")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))], [f"k={k}" if k else "all" for k in ks])
    ax.set(ylabel="test accuracy", ylim=(0, 1), title=f"{result['model']} / {result['task']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
