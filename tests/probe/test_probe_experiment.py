"""``run_probe`` end to end on a tiny model and a task file: outputs, reuse of the store, bad input."""

import json

import numpy as np
import pytest

from ftlab.config import load_config
from ftlab.errors import FtlabError
from ftlab.probe import cache
from ftlab.probe.experiment import ProbeConfig, balanced_rows, run_probe

WORDS = ["great", "terrible", "good", "bad", "movie", "film", "story", "acting", "plot"]


def _task_file(path, n=48, classes=2):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            label = i % classes
            text = " ".join(rng.choice(WORDS, 5)) + (" great" if label else " terrible")
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def _cfg(tmp_path, task, **kw):
    over = [f"task={task}", "template={text} It was", "options=[' terrible', ' great']", "model=tiny",
            "n_train=24", "n_dev=8", "n_test=12", "k=[0, 4]", "seeds=[0, 1]", "grid=[0.1, 10.0]",
            f"output_dir={tmp_path / 'out'}", *[f"{k}={v}" for k, v in kw.items()]]
    return load_config(ProbeConfig, None, over)


def test_run_probe_writes_results_and_reuses_its_store(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    cfg = _cfg(tmp_path, _task_file(tmp_path / "toy.jsonl"), kinds="[f, phi_p, p_words, layer]")
    result = run_probe(cfg, model_and_tokenizer=(tiny_model, tiny_tokenizer))
    out = tmp_path / "out"
    assert {"results.json", "results.md", "probe.png", "features"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "results.json").read_text())["summary"] == result["summary"]
    kinds = {(r["k"], r["kind"]) for r in result["rows"]}
    assert kinds == {(k, kind) for k in (0, 4) for kind in ("f", "phi_p", "p_words", "layer")}
    assert all(r["n_train"] == (24 if r["k"] == 0 else 8) for r in result["rows"])
    assert 0 <= result["theory"]["zero_shot"]["accuracy"] <= 1 and result["layer"] == 1
    # a rerun of a finished study computes no feature
    monkeypatch.setattr(cache, "extract", lambda *a, **k: pytest.fail("recomputed stored features"))
    again = run_probe(cfg, model_and_tokenizer=(tiny_model, tiny_tokenizer))
    assert again["rows"] == result["rows"]


def test_store_of_another_model_is_refused(tmp_path, tiny_model, tiny_model_factory, tiny_tokenizer):
    task = _task_file(tmp_path / "toy.jsonl")
    run_probe(_cfg(tmp_path, task, kinds="[f]", theory="false"), model_and_tokenizer=(tiny_model, tiny_tokenizer))
    with pytest.raises(FtlabError, match="holds features of model 'tiny'.*not 'gpt2'"):
        run_probe(_cfg(tmp_path, task, kinds="[f]", theory="false", model="gpt2"),
                  model_and_tokenizer=(tiny_model_factory("gpt2"), tiny_tokenizer))


def test_one_class_task_and_generation_task_are_refused(tmp_path, tiny_model, tiny_tokenizer):
    one = _task_file(tmp_path / "one.jsonl", classes=1)
    with pytest.raises(FtlabError, match="one class; a probe needs >= 2 classes"):
        run_probe(_cfg(tmp_path, one), model_and_tokenizer=(tiny_model, tiny_tokenizer))
    with pytest.raises(FtlabError, match="is 2 tokens|single-token"):
        run_probe(_cfg(tmp_path, _task_file(tmp_path / "toy.jsonl"), words="[' great', ' not good at all']"),
                  model_and_tokenizer=(tiny_model, tiny_tokenizer))


def test_config_is_checked():
    with pytest.raises(FtlabError, match="kinds: must be"):
        load_config(ProbeConfig, None, ["kinds=[f, logits]"])
    with pytest.raises(FtlabError, match="k: must be"):
        load_config(ProbeConfig, None, ["k=[-1]"])


def test_balanced_rows():
    y = np.array([0, 1, 0, 1, 0, 1, 1])
    rows = balanced_rows(y, 2, seed=0, what="train")
    assert sorted(y[rows].tolist()) == [0, 0, 1, 1]
    assert (rows == balanced_rows(y, 2, seed=0, what="train")).all()
    with pytest.raises(FtlabError, match="only 3 examples of class 0"):
        balanced_rows(y, 4, seed=0, what="train")


@pytest.mark.parametrize("name", ["probe-sentiment", "probe-quick"])
def test_packaged_probe_configs_load(name):
    from ftlab.cli.common import config_path

    cfg = load_config(ProbeConfig, config_path(name))
    assert cfg.task == "sentiment" and 0 in cfg.k and cfg.output_dir.startswith("runs/")
