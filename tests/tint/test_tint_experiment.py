import json

import numpy as np
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.tasks.base import Example, TaskSpec
from ftlab.tint.experiment import (
    TintEvalConfig,
    choose_lrs,
    chosen_steps,
    classify,
    encode_context,
    lm_texts,
    method_name,
    report_markdown,
    run_task,
    single_token_options,
    summarize_lm,
    summarize_task,
)
from ftlab.tint.inner import forward, inner_from_hf
from ftlab.tint.reference import Approximations, approximate_step, exact_step

SPEC = TaskSpec(name="toy", template="Review: {text} It was", options=[" negative", " positive"])
TEXTS = ["the movie was great", "a terrible plot", "good acting and a good story", "bad and boring",
         "the film was good", "the acting was bad", "great story", "terrible film"]
EXAMPLES = [Example(id=f"toy:{i}", fields={"text": t}, label=int(i % 2 == 0)) for i, t in enumerate(TEXTS)]


@pytest.fixture
def setup(tiny_model, tiny_tokenizer):
    return inner_from_hf(tiny_model, torch.float64), tiny_tokenizer


def test_context_marks_the_positions_before_label_words(setup):
    _, tok = setup
    opts = single_token_options(tok, SPEC)
    ctx = encode_context(tok, SPEC, EXAMPLES[:3], EXAMPLES[3], 512, opts)
    ids = ctx.ids.tolist()
    marked = ctx.label_mask.nonzero().squeeze(-1).tolist()
    assert [ids[p + 1] for p in marked] == [opts[e.label] for e in EXAMPLES[:3]]
    assert max(marked) < ctx.n_train - 1
    assert ids[ctx.n_train:] == ctx.query.tolist()
    short = encode_context(tok, SPEC, EXAMPLES[:3], EXAMPLES[3], len(ids) - 2, opts)  # first demo dropped
    assert int(short.label_mask.sum()) == 2
    with pytest.raises(FtlabError, match="no room for a demonstration"):
        encode_context(tok, SPEC, EXAMPLES[:3], EXAMPLES[3], len(ctx.query), opts)


def test_multi_token_label_words_are_refused(tiny_tokenizer):
    spec = TaskSpec(name="toy", template="{text}", options=[" positive review", " negative"])
    with pytest.raises(FtlabError, match="one token"):
        single_token_options(tiny_tokenizer, spec)


def test_classify_runs_every_method_consistently(setup):
    inner, tok = setup
    opts = single_token_options(tok, SPEC)
    ctx = encode_context(tok, SPEC, EXAMPLES[:3], EXAMPLES[3], 512, opts)
    cfg = TintEvalConfig(layers=[1, 2], lrs=[0.1], losses=["label", "context"], tasks=["toy"])
    out = classify(inner, ctx, opts, cfg)
    assert set(out) == {"zero-shot", "ICL"} | {method_name(m, k, loss, 0.1) for m in ("exact", "approx")
                                                for k in (1, 2) for loss in ("label", "context")}
    torch.testing.assert_close(out["ICL"], forward(inner, ctx.ids)[0][-1, opts])
    ref = approximate_step(inner, ctx.ids, ctx.n_train, ctx.label_mask, 2, 0.1, Approximations(True, 100.0, True))
    torch.testing.assert_close(out[method_name("approx", 2, "label", 0.1)], ref.test_logits[-1, opts])
    ex = exact_step(inner, ctx.ids, ctx.n_train, ctx.label_mask, 1, 0.1, sum_over_tokens=True)
    torch.testing.assert_close(out[method_name("exact", 1, "label", 0.1)], ex.test_logits[-1, opts])


def test_run_task_checks_the_tint_forward(setup):
    inner, tok = setup
    cfg = TintEvalConfig(layers=[1], lrs=[0.1], losses=["label"], tasks=["toy"], shots=2, seeds=[0],
                         tint_examples=2, n_prefixes=8)
    part = run_task(inner, tok, SPEC, EXAMPLES[:4], EXAMPLES[4:], cfg, seed=0)
    assert len(part["tint_check"]) == 2
    assert all(r["max_abs_diff"] < 1e-9 and r["same_prediction"] for r in part["tint_check"])
    assert all(len(v) == 4 for v in part["correct"].values())
    json.dumps(part)  # stored as JSON


def test_summary_intervals():
    rng = np.random.default_rng(0)
    icl = rng.integers(0, 2, (2, 50)).tolist()
    better = [[1] * 50, [1] * 50]
    parts = [{"correct": {"zero-shot": icl[s], "ICL": icl[s], "m": better[s]},
              "loss": {"zero-shot": [0.5] * 50, "ICL": [0.5] * 50, "m": [0.1] * 50}} for s in range(2)]
    rows = summarize_task(parts)
    d = rows["m"]["vs_ICL"]
    assert d["estimate"] == pytest.approx(1 - np.mean(icl)) and d["low"] <= d["estimate"] <= d["high"]
    assert d["low"] > 0
    assert "vs_ICL" not in rows["ICL"]
    same = rows["zero-shot"]["vs_ICL"]  # identical predictions: a paired difference of exactly 0
    assert same["estimate"] == same["low"] == same["high"] == 0.0
    lm = summarize_lm({"base": [2.0, 2.2, 2.1], "exact": [1.9, 2.0, 2.0]})
    assert lm["exact"]["vs_base_loss"]["estimate"] == pytest.approx(-0.1333333, abs=1e-6)
    text = report_markdown({"tasks": {"toy": rows}, "lm": lm})
    assert "| m | 1.000 |" in text and "language modelling" in text


def test_lr_is_chosen_on_dev_queries_by_accuracy_then_loss():
    cfg = TintEvalConfig(layers=[1], lrs=[0.01, 0.1, 1.0], losses=["label"], tasks=["toy"])
    dev = {"correct": {"zero-shot": [0, 0], "ICL": [1, 0],
                       "exact k=1 label lr=0.01": [1, 0], "exact k=1 label lr=0.1": [1, 1],
                       "exact k=1 label lr=1": [1, 1],
                       "approx k=1 label lr=0.01": [1, 0], "approx k=1 label lr=0.1": [1, 0],
                       "approx k=1 label lr=1": [0, 0]},
           "loss": {"zero-shot": [1.0, 1.0], "ICL": [0.5, 0.5],
                    "exact k=1 label lr=0.01": [0.1, 0.1], "exact k=1 label lr=0.1": [0.5, 0.5],
                    "exact k=1 label lr=1": [0.3, 0.4],
                    "approx k=1 label lr=0.01": [0.2, 0.2], "approx k=1 label lr=0.1": [0.2, 0.2],
                    "approx k=1 label lr=1": [0.0, 0.0]}}
    chosen = choose_lrs(dev, cfg)
    # exact: 0.1 and 1 tie on accuracy, 1 has the lower loss; approx: 0.01 and 0.1 tie on both -> smaller lr
    assert chosen == {"exact k=1 label": 1.0, "approx k=1 label": 0.01}
    assert chosen_steps(chosen, cfg) == [(1, "label", 0.01), (1, "label", 1.0)]
    rows = summarize_task([dev])
    text = report_markdown({"tasks": {"toy": rows}, "chosen_lr": {"toy": chosen}, "dev": {"toy": rows}})
    assert "exact k=1 label 1 (1.000)" in text and "approx k=1 label 0.01 (0.500)" in text


def test_config_is_checked():
    with pytest.raises(FtlabError, match="losses"):
        TintEvalConfig(losses=["tokens"])
    with pytest.raises(FtlabError, match="shots"):
        TintEvalConfig(shots=0)


def test_figure_is_a_png(tmp_path):
    from ftlab.tint.figure import draw_tint
    path = draw_tint(tmp_path / "tint.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_run_eval_chooses_lrs_on_dev_and_resumes(tmp_path, tiny_model, tiny_tokenizer):
    from ftlab.tint.experiment import run_eval
    cfg = TintEvalConfig(tasks=["sentiment"], shots=2, n_test=3, n_dev=2, seeds=[0, 1], layers=[1], lrs=[0.01, 1.0],
                         losses=["label"], tint_examples=1, n_prefixes=8, lm_texts=2, lm_length=16, max_length=256,
                         output_dir=str(tmp_path / "run"))
    summary = run_eval(cfg, model=tiny_model.double(), tokenizer=tiny_tokenizer)
    dev = json.loads((tmp_path / "run/parts/sentiment-dev.json").read_text())
    assert {len(v) for v in dev["correct"].values()} == {2} and dev["tint_check"] == []
    chosen = summary["chosen_lr"]["sentiment"]
    assert chosen == choose_lrs(dev, cfg)
    tested = {m for m in summary["tasks"]["sentiment"] if m not in ("zero-shot", "ICL")}
    assert tested == {method_name(kind, 1, "label", lr) for kind in ("exact", "approx") for lr in set(chosen.values())}
    part = tmp_path / "run/parts/sentiment-seed0.json"
    assert len(json.loads(part.read_text())["tint_check"]) == 1
    # Language modelling on two disflqa contexts (Wikipedia paragraphs) cut to 16 tokens: base and every step.
    lm = json.loads((tmp_path / "run/parts/lm.json").read_text())
    assert set(lm) == {"base"} | {method_name(kind, 1, "context", lr) for kind in ("exact", "approx")
                                  for lr in (0.01, 1.0)}
    assert {len(v) for v in lm.values()} == {2} and set(summary["lm"]) == set(lm)
    stamps = {p: p.stat().st_mtime_ns for p in (part, tmp_path / "run/parts/lm.json")}
    again = run_eval(cfg, model=tiny_model, tokenizer=tiny_tokenizer)  # resumed: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again["chosen_lr"] == summary["chosen_lr"]
    report = (tmp_path / "run/report.md").read_text()
    assert "inner lr chosen on the dev queries" in report and "disflqa contexts" in report


def test_lm_texts_are_distinct_disflqa_paragraphs_cut_to_length(tiny_tokenizer):
    from ftlab.tasks import load_task

    texts = lm_texts(tiny_tokenizer, 5, 32)
    assert len(texts) == 5 and all(len(t) == 32 for t in texts) and len({tuple(t) for t in texts}) == 5
    contexts = list(dict.fromkeys(e.fields["context"] for e in load_task("disflqa")[1]))
    assert tiny_tokenizer.decode(texts[0]) == tiny_tokenizer.decode(
        tiny_tokenizer(contexts[0], add_special_tokens=False)["input_ids"][:32])


def test_default_tasks_are_classification_tasks_of_a_default_source():
    """The default TinT tasks load with no archive (not BIG-bench) and ask for label words."""
    from ftlab.tasks.registry import builtin_task

    for name in TintEvalConfig().tasks:
        task = builtin_task(name)
        assert task.source is not None and task.spec.kind == "classification", name
