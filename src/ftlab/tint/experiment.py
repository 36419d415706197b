"""TinT's evaluations, as in the paper, on the embedded model and built-in tasks.

Few-shot classification: each test query is preceded by ``shots`` solved demonstrations (the
*training part*); the query is the *test part*, and the prediction is the label word with the
highest logit after the query (every built-in task here has one-token label words). Methods:

- ``zero-shot``: the query alone; ``ICL``: demonstrations + query, no update;
- ``exact``: exact dynamic evaluation (autograd, one SGD step on the top ``k`` layers' linear
  weights, loss summed over the loss tokens) on the demonstrations, then the query;
- ``approx``: the same step with TinT's approximations (:func:`ftlab.tint.reference.approximate_step`);
- ``TinT``: the constructed TinT's single forward pass, on the first ``tint_examples`` queries of
  the first seed (it returns the ``approx`` logits; the run records the largest difference).

The loss is on the demonstrations' label words (``label``) or on every token of the training
part (``context``). Seeds draw the demonstrations. With ``n_dev > 0`` each method's inner learning
rate is chosen per task on ``n_dev`` held-out *dev* queries (first seed, every lr of ``lrs``: best
accuracy, ties to the lower option loss), and the test queries run only the chosen rates.
Improvements over ICL and over zero-shot come with a multi-bootstrap interval over seeds and
test examples (:mod:`ftlab.bootstrap`).

The default tasks (``sentiment``, ``trec``, ``factual_summary``: binary sentiment, 6-way question
type, binary entailment) have one-token label words and prompts short enough that, with SmolLM2's
tokenizer, 4 demonstrations and the query fit in 512 tokens (``tint-eval``'s 300 test contexts: at
most 463; a longer context drops its first demonstrations). Long-passage tasks do not: in 512
tokens ``boolq`` keeps about 2 of 4 demonstrations and ``corr2cause`` about 1, and some of their
queries alone exceed it, which stops the run (:func:`encode_context`).

Language modelling: held-out Wikipedia paragraphs (the SQuAD v2 contexts of ``disflqa``) cut to
``lm_length`` tokens; one step on the first half (``context`` loss), perplexity of the second half.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ftlab.bootstrap import multi_bootstrap
from ftlab.config import Settings, above, at_least, every, needs, non_empty, setting
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json, atomic_write_text
from ftlab.plots import optional
from ftlab.runs import check_settings, writes_run_dir
from ftlab.tasks.base import Example, TaskSpec
from ftlab.tint.construct import TintConfig, build_tint
from ftlab.tint.inner import InnerModel, forward, inner_from_hf
from ftlab.tint.reference import Approximations, approximate_step, exact_step, test_part_loss, whole_context_mask

Progress = Callable[[str, int, int], None]


@needs("a non-empty list of 'label' and/or 'context'")
def _loss_kinds(losses: list[str]) -> bool:
    return bool(losses) and not set(losses) - {"label", "context"}


@dataclass
class TintEvalConfig(Settings):
    """One evaluation run (``ftlab tint eval``)."""

    where = "tint eval config"

    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["sentiment", "trec", "factual_summary"])
    shots: int = setting(4, check=at_least(1), need=">= 1 (the demonstrations are the training part)")
    n_test: int = setting(100, check=at_least(2))
    # dev queries that choose each method's lr (0: every lr of ``lrs`` on the test queries)
    n_dev: int = setting(0, check=at_least(0))
    seeds: list[int] = setting(factory=lambda: [0, 1], check=non_empty, need="a non-empty list of seeds")
    layers: list[int] = setting(factory=lambda: [1, 4], check=every(at_least(1)),
                                  need="a non-empty list of layer counts >= 1")
    lrs: list[float] = setting(factory=lambda: [1e-4, 1e-3], check=every(above(0)),
                                 need="a non-empty list of learning rates > 0")
    losses: list[str] = setting(factory=lambda: ["label", "context"], check=_loss_kinds)
    finite_diff_n: float = setting(100.0, check=above(0))
    n_prefixes: int = 64
    tint_examples: int = setting(8, check=at_least(0))
    lm_texts: int = setting(40, check=at_least(0))
    lm_length: int = setting(128, check=at_least(2))
    data_seed: int = 0
    max_length: int = setting(512, check=at_least(2))
    output_dir: str = "runs/tint-eval"


# --------------------------------------------------------------------------- encoding

@dataclass
class Context:
    """Token ids of demonstrations + query, the split, and the label-word loss positions."""

    ids: torch.Tensor
    n_train: int
    label_mask: torch.Tensor
    query: torch.Tensor


def encode_context(tokenizer, spec: TaskSpec, demos: Sequence[Example], query: Example, max_length: int,
                   option_ids: list[int]) -> Context:
    """Demonstrations (prompt, label word, separator) then the query prompt; demonstrations are
    dropped from the front until the whole fits in ``max_length`` tokens."""
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    q = tok(spec.prompt(query))
    pieces = [(tok(spec.prompt(d)), option_ids[d.label], tok(spec.demo_separator)) for d in demos]
    while pieces and sum(len(p) + 1 + len(s) for p, _, s in pieces) + len(q) > max_length:
        pieces.pop(0)
    if not pieces:
        raise FtlabError(f"{query.source or query.id}: the query alone ({len(q)} tokens) leaves no room for a "
                         f"demonstration within max_length={max_length}; raise max_length")
    ids, label_pos = [], []
    for prompt, label, sep in pieces:
        ids += prompt
        label_pos.append(len(ids) - 1)  # this position predicts the label word
        ids += [label] + sep
    n_train = len(ids)
    ids_t = torch.tensor(ids + q)
    mask = torch.zeros(len(ids_t), dtype=torch.bool)
    mask[label_pos] = True
    return Context(ids_t, n_train, mask, torch.tensor(q))


def single_token_options(tokenizer, spec: TaskSpec) -> list[int]:
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in spec.options]
    if spec.kind != "classification" or any(len(i) != 1 for i in ids):
        raise FtlabError(f"task {spec.name}: TinT evaluation needs classification label words of one token "
                         f"each; {spec.options} tokenise to {ids}")
    return [i[0] for i in ids]


def draw_demos(pool: Sequence[Example], query: Example, shots: int, seed: int) -> list[Example]:
    """``shots`` demonstrations for ``query``, drawn as :func:`ftlab.objectives.build_prompts` does."""
    rng = random.Random(f"{seed}:{query.id}")
    return rng.sample([d for d in pool if d.id != query.id], shots)


# ------------------------------------------------------------------------- the methods

Step = tuple[int, str, float]  # (top layers k, loss, inner lr)


def _settings(cfg: TintEvalConfig) -> list[Step]:
    return [(k, loss, lr) for k in cfg.layers for loss in cfg.losses for lr in cfg.lrs]


def choose_lrs(dev: dict[str, Any], cfg: TintEvalConfig) -> dict[str, float]:
    """Per method family (``"exact k=1 label"``...), the lr of ``cfg.lrs`` with the best dev
    accuracy; ties go to the lower mean option loss, then to the smaller lr."""
    chosen = {}
    for kind in ("exact", "approx"):
        for k in cfg.layers:
            for loss in cfg.losses:
                family = family_name(kind, k, loss)

                def score(lr: float, family=family) -> tuple[float, float, float]:
                    m = with_lr(family, lr)
                    return (-float(np.mean(dev["correct"][m])), float(np.mean(dev["loss"][m])), lr)
                chosen[family] = min(cfg.lrs, key=score)
    return chosen


def chosen_steps(chosen: dict[str, float], cfg: TintEvalConfig) -> list[Step]:
    """The (k, loss, lr) steps the test queries need: every chosen lr (both kinds run at each, so
    exact and approx stay paired)."""
    return [(k, loss, lr) for k in cfg.layers for loss in cfg.losses for lr in cfg.lrs
            if lr in (chosen[family_name("exact", k, loss)], chosen[family_name("approx", k, loss)])]


def family_name(kind: str, k: int, loss: str) -> str:
    """A method without its lr (``"exact k=1 label"``): what an lr is chosen for."""
    return f"{kind} k={k} {loss}"


def with_lr(family: str, lr: float) -> str:
    return f"{family} lr={lr:g}"


def method_name(kind: str, k: int, loss: str, lr: float) -> str:
    return with_lr(family_name(kind, k, loss), lr)


def classify(inner: InnerModel, ctx: Context, option_ids: list[int], cfg: TintEvalConfig,
             steps: list[Step] | None = None) -> dict[str, torch.Tensor]:
    """Option logits after the query for every method (but TinT): zero-shot, ICL and, for each
    step (default: every setting of ``cfg``), its exact and approximate update."""
    opts = torch.tensor(option_ids)
    approx = Approximations(True, cfg.finite_diff_n, True)
    with torch.no_grad():
        out = {"zero-shot": forward(inner, ctx.query, last_only=True)[0][-1, opts]}
        logits, inputs = forward(inner, ctx.ids, last_only=True)
        out["ICL"] = logits[-1, opts]
    n = inner.spec.n_layers
    for k, loss, lr in _settings(cfg) if steps is None else steps:
        mask = ctx.label_mask if loss == "label" else whole_context_mask(ctx.ids, ctx.n_train)
        h0 = inputs[n - k]
        ex = exact_step(inner, ctx.ids, ctx.n_train, mask, k, lr, sum_over_tokens=True, h0=h0, last_only=True)
        ap = approximate_step(inner, ctx.ids, ctx.n_train, mask, k, lr, approx, h0=h0, last_only=True)
        out[method_name("exact", k, loss, lr)] = ex.test_logits[-1, opts]
        out[method_name("approx", k, loss, lr)] = ap.test_logits[-1, opts]
    return out


def run_task(inner: InnerModel, tokenizer, spec: TaskSpec, pool: Sequence[Example], test: Sequence[Example],
             cfg: TintEvalConfig, seed: int, progress: Progress | None = None, steps: list[Step] | None = None,
             tint_check: bool = True, label: str = "") -> dict[str, Any]:
    """Per-example correctness and option loss of every method on one task and seed (``steps``:
    the updates to run, default every setting); on the first seed, the TinT check on the first
    ``tint_examples`` queries, at the first step's setting."""
    steps = _settings(cfg) if steps is None else steps
    option_ids = single_token_options(tokenizer, spec)
    correct: dict[str, list[int]] = {}
    losses: dict[str, list[float]] = {}
    tint_rows = []
    tint = None
    if tint_check and seed == cfg.seeds[0] and cfg.tint_examples:
        k, loss, lr = steps[0]
        tint = (build_tint(inner, TintConfig(cfg.n_prefixes, k, lr, cfg.finite_diff_n)), k, loss, lr)
    started = time.perf_counter()
    for i, query in enumerate(test):
        ctx = encode_context(tokenizer, spec, draw_demos(pool, query, cfg.shots, seed), query, cfg.max_length,
                             option_ids)
        scores = classify(inner, ctx, option_ids, cfg, steps)
        if tint is not None and i < cfg.tint_examples:
            model, k, loss, lr = tint
            mask = ctx.label_mask if loss == "label" else whole_context_mask(ctx.ids, ctx.n_train)
            t0 = time.perf_counter()
            logits = model(ctx.ids, ctx.n_train, mask)[-1, torch.tensor(option_ids)]
            name = method_name("approx", k, loss, lr)
            tint_rows.append({"max_abs_diff": float((logits - scores[name]).abs().max()),
                              "same_prediction": int(logits.argmax()) == int(scores[name].argmax()),
                              "seconds": time.perf_counter() - t0, "tokens": len(ctx.ids)})
        gold = torch.tensor(query.label)
        for name, s in scores.items():
            correct.setdefault(name, []).append(int(int(s.argmax()) == query.label))
            losses.setdefault(name, []).append(float(F.cross_entropy(s.double()[None], gold[None])))
        if progress:
            progress(f"{spec.name}{label} seed {seed}", i + 1, len(test))
    return {"correct": correct, "loss": losses, "tint_check": tint_rows,
            "seconds": time.perf_counter() - started, "n": len(test)}


def lm_texts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` distinct Wikipedia paragraphs (the SQuAD v2 contexts of task ``disflqa``, in source
    order) cut to their first ``length`` tokens (those long enough)."""
    from ftlab.tasks import load_task
    _, examples = load_task("disflqa")
    seen, out = set(), []
    for ex in examples:
        text = ex.fields.get("context", "")
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


def run_lm(inner: InnerModel, texts: list[list[int]], cfg: TintEvalConfig, progress: Progress | None = None
           ) -> dict[str, list[float]]:
    """Second-half next-token loss of every text: base, and after a step on the first half."""
    approx = Approximations(True, cfg.finite_diff_n, True)
    out: dict[str, list[float]] = {}
    n = inner.spec.n_layers
    for i, toks in enumerate(texts):
        ids = torch.tensor(toks)
        n_train = len(toks) // 2
        mask = whole_context_mask(ids, n_train)
        with torch.no_grad():
            logits, inputs = forward(inner, ids)
        out.setdefault("base", []).append(test_part_loss(ids, n_train, logits[n_train:]))
        for k in cfg.layers:
            for lr in cfg.lrs:
                ex = exact_step(inner, ids, n_train, mask, k, lr, sum_over_tokens=True, h0=inputs[n - k])
                ap = approximate_step(inner, ids, n_train, mask, k, lr, approx, h0=inputs[n - k])
                out.setdefault(method_name("exact", k, "context", lr), []).append(
                    test_part_loss(ids, n_train, ex.test_logits))
                out.setdefault(method_name("approx", k, "context", lr), []).append(
                    test_part_loss(ids, n_train, ap.test_logits))
        if progress:
            progress("language modelling", i + 1, len(texts))
    return out


# ------------------------------------------------------------------------------ summary

def summarize_task(parts: list[dict[str, Any]], n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Accuracy of each method (mean over seeds and examples) and its improvement over ICL and
    zero-shot with 95% multi-bootstrap intervals. The methods are *paired* (one seed draws the
    same demonstrations for every method), so the per-(seed, example) differences are
    bootstrapped, seeds and examples resampled together."""
    methods = list(parts[0]["correct"])
    mat = {m: np.array([p["correct"][m] for p in parts], dtype=float) for m in methods}
    out = {}
    for m in methods:
        row = {"accuracy": float(mat[m].mean()), "loss": float(np.mean([p["loss"][m] for p in parts]))}
        for base in ("ICL", "zero-shot"):
            if m != base:
                iv = multi_bootstrap(mat[m] - mat[base], n_boot=n_boot, seed=0)
                row[f"vs_{base}"] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high}
        out[m] = row
    return out


def summarize_lm(losses: dict[str, list[float]], n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    base = np.array([losses["base"]])
    out = {}
    for m, v in losses.items():
        row = {"loss": float(np.mean(v)), "perplexity": float(math.exp(np.mean(v)))}
        if m != "base":
            iv = multi_bootstrap(np.array([v]) - base, n_boot=n_boot, seed=0)  # paired by text
            row["vs_base_loss"] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high}
        out[m] = row
    return out


def report_markdown(summary: dict[str, Any]) -> str:
    lines = []
    for task, rows in summary["tasks"].items():
        lines += [f"### {task}", ""]
        chosen = summary.get("chosen_lr", {}).get(task)
        if chosen:
            dev = summary["dev"][task]
            lines += ["inner lr chosen on the dev queries (dev accuracy): " + ", ".join(
                f"{m} {lr:g} ({dev[with_lr(m, lr)]['accuracy']:.3f})" for m, lr in chosen.items()), ""]
        lines += ["| method | accuracy | vs ICL (95% CI) | vs zero-shot (95% CI) |", "|---|---|---|---|"]
        for m, r in rows.items():
            fmt = lambda key, r=r: (  # noqa: E731
                f"{r[key]['estimate']:+.3f} [{r[key]['low']:+.3f}, {r[key]['high']:+.3f}]" if key in r else "")
            lines.append(f"| {m} | {r['accuracy']:.3f} | {fmt('vs_ICL')} | {fmt('vs_zero-shot')} |")
        lines.append("")
    if summary.get("lm"):
        lines += ["### language modelling (second half of Wikipedia paragraphs, disflqa contexts)", "",
                  "| method | loss | perplexity | loss vs base (95% CI) |", "|---|---|---|---|"]
        for m, r in summary["lm"].items():
            d = r.get("vs_base_loss")
            lines.append(f"| {m} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
                         + (f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "") + " |")
    return "\n".join(lines) + "\n"


@optional
def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Accuracy minus ICL per method and task, with the intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = {m: r for m, r in summary["tasks"][task].items() if "vs_ICL" in r}
        names = list(rows)
        est = [rows[m]["vs_ICL"]["estimate"] for m in names]
        err = [[e - rows[m]["vs_ICL"]["low"] for m, e in zip(names, est)],
               [rows[m]["vs_ICL"]["high"] - e for m, e in zip(names, est)]]
        colors = ["tab:gray" if m == "zero-shot" else "tab:blue" if m.startswith("exact") else "tab:orange"
                  for m in names]
        ax.barh(range(len(names)), est, xerr=err, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{task}: accuracy minus ICL")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- the run

@writes_run_dir("tint", "cfg.output_dir")
def run_eval(cfg: TintEvalConfig, progress: Progress | None = None, model=None, tokenizer=None) -> dict[str, Any]:
    """The whole evaluation into ``cfg.output_dir``: ``parts/<task>-seed<s>.json`` (resumable:
    finished parts are kept), ``parts/lm.json``, ``summary.json``, ``report.md``, ``tint_eval.png``."""
    from ftlab.models import load_model
    from ftlab.tasks import load_task, make_splits

    out = Path(cfg.output_dir)
    settings = {k: v for k, v in asdict(cfg).items() if k != "output_dir"}
    stored = out / "config.json"
    check_settings(out, "TinT evaluation", _read(stored), settings)
    atomic_write_json(stored, settings)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    inner = inner_from_hf(model, torch.float32)
    (out / "parts").mkdir(exist_ok=True)
    summary: dict[str, Any] = {"tasks": {}, "tint_check": {}, "seconds": {}}
    for task in cfg.tasks:
        spec, examples = load_task(task)
        splits = make_splits(examples, seed=0, n_train=max(200, 4 * cfg.shots), n_dev=cfg.n_dev,
                             n_test=cfg.n_test, data_seed=cfg.data_seed)
        steps = None
        if cfg.n_dev:
            path = out / "parts" / f"{task}-dev.json"
            dev = _read(path)
            if dev is None:
                dev = run_task(inner, tokenizer, spec, splits.train, splits.dev, cfg, cfg.seeds[0], progress,
                               tint_check=False, label=" (dev, lr choice)")
                atomic_write_json(path, dev)
            chosen = choose_lrs(dev, cfg)
            summary.setdefault("chosen_lr", {})[task] = chosen
            summary.setdefault("dev", {})[task] = summarize_task([dev])
            steps = chosen_steps(chosen, cfg)
        parts = []
        for seed in cfg.seeds:
            path = out / "parts" / f"{task}-seed{seed}.json"
            part = _read(path)
            if part is None:
                part = run_task(inner, tokenizer, spec, splits.train, splits.test, cfg, seed, progress, steps)
                atomic_write_json(path, part)
            parts.append(part)
        summary["tasks"][task] = summarize_task(parts)
        summary["tint_check"][task] = parts[0]["tint_check"]
        summary["seconds"][task] = sum(p["seconds"] for p in parts)
    if cfg.lm_texts:
        path = out / "parts" / "lm.json"
        lm = _read(path)
        if lm is None:
            lm = run_lm(inner, lm_texts(tokenizer, cfg.lm_texts, cfg.lm_length), cfg, progress)
            atomic_write_json(path, lm)
        summary["lm"] = summarize_lm(lm)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", report_markdown(summary))
    plot_summary(summary, out / "tint_eval.png")
    return summary


def _read(path: Path) -> Any:
    import json
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        from ftlab.errors import damaged
        raise damaged(path, e, "delete it to recompute that part") from e
