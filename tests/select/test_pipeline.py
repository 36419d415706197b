"""End to end: LESS on a tiny Llama and a tiny synthetic pool prefers the target's own family."""

from __future__ import annotations

import collections
import json
import random

import pytest

from ftlab.errors import FtlabError
from ftlab.models import LoraSettings
from ftlab.select.pipeline import SelectConfig, run_pipeline
from ftlab.select.warmup import WarmupSettings

from less_fixtures import write_jsonl

# Three families with distinct prompts and responses (every word is a key word of the tiny tokenizer).
FAMILIES = {
    "sentiment": ("Review: the movie was {w}. Sentiment:", [" positive", " negative"]),
    "qa": ("Question: is the story {w}? Answer:", [" yes", " no", " maybe"]),
    "nli": ("Premise: the plot was {w}. Hypothesis: the acting was good. Answer:", [" true", " false", " neutral"]),
}
WORDS = ["great", "terrible", "good", "bad"]


def _rows(family: str, n: int, rng: random.Random) -> list[dict]:
    template, answers = FAMILIES[family]
    return [{"prompt": template.format(w=rng.choice(WORDS)), "response": rng.choice(answers),
             "task": f"{family}-{i % 2}", "family": family} for i in range(n)]


@pytest.fixture
def tiny_pool(tmp_path):
    rng = random.Random(0)
    pool = [r for f in FAMILIES for r in _rows(f, 20, rng)]
    rng.shuffle(pool)
    return write_jsonl(tmp_path / "pool.jsonl", pool), write_jsonl(tmp_path / "target.jsonl", _rows("qa", 4, rng))


def _config(tmp_path, pool, target, method="less", **kw) -> SelectConfig:
    return SelectConfig(pool=[str(pool)], targets=[str(target)], output_dir=str(tmp_path / f"run-{method}"),
                        method=method, model="tiny", lora=LoraSettings(r=4, alpha=8),
                        warmup=WarmupSettings(percentage=0.25, epochs=2, lr=1e-3, batch_size=5),
                        projection_dim=256, batch_size=8, max_length=64, percentage=None, top_k=10, **kw)


def test_less_prefers_the_target_family_and_a_rerun_reuses_everything(tmp_path, tiny_model_factory,
                                                                     tiny_tokenizer, tiny_pool):
    cfg = _config(tmp_path, *tiny_pool)
    summary = run_pipeline(cfg, tiny_model_factory(), tiny_tokenizer, progress=False)
    out = tmp_path / "run-less"
    selected = [json.loads(line) for line in (out / "selected_data.jsonl").read_text().splitlines()]
    families = collections.Counter(r["family"] for r in selected)
    # The pool is 1/3 qa; random picks ~3.3 of 10. LESS must pick mostly qa.
    assert families["qa"] >= 8, families
    assert summary["families"] == dict(families.most_common())
    assert len((out / "scores.csv").read_text().splitlines()) == 61  # header + every pool example
    assert (out / "selection.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "warmup").glob("epoch-*")) == ["epoch-1", "epoch-2"]
    before = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.bin")}
    assert len(before) == 4  # train and target stores at two checkpoints
    again = run_pipeline(cfg, tiny_model_factory(), tiny_tokenizer, progress=False)
    assert again == summary
    assert before == {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.bin")}


def test_representation_baseline_prefers_the_target_family(tmp_path, tiny_model, tiny_tokenizer, tiny_pool):
    summary = run_pipeline(_config(tmp_path, *tiny_pool, method="representation"), tiny_model, tiny_tokenizer,
                           progress=False)
    assert summary["families"].get("qa", 0) >= 8, summary["families"]


def test_random_baseline_is_seeded(tmp_path, tiny_pool):
    a = run_pipeline(_config(tmp_path, *tiny_pool, method="random"), progress=False)
    picks = (tmp_path / "run-random" / "selected.jsonl").read_text()
    b = run_pipeline(_config(tmp_path, *tiny_pool, method="random"), progress=False)
    assert a == b and picks == (tmp_path / "run-random" / "selected.jsonl").read_text()
    c = run_pipeline(_config(tmp_path, *tiny_pool, method="random", seed=1), progress=False)
    assert c["tasks"] != a["tasks"] or c["families"] != a["families"]


def test_bad_configs_are_one_line_errors(tmp_path, tiny_pool):
    pool, target = tiny_pool
    with pytest.raises(FtlabError, match="target set is empty"):
        run_pipeline(_config(tmp_path, pool, target).__class__(pool=[str(pool)], targets=[]), progress=False)
    with pytest.raises(FtlabError, match="unknown selection method"):
        run_pipeline(_config(tmp_path, pool, target, method="magic"), progress=False)
    with pytest.raises(FtlabError, match="share files"):
        run_pipeline(_config(tmp_path, pool, pool), progress=False)
