"""The demo recipe on a tiny model: three rows (zero-shot, MeZO LoRA, AdamW LoRA), their run
folders, the rows file a rerun reuses, the plot; the packaged demo config is valid."""

import json

import pytest

from ftlab.config import load_config
from ftlab.configs import packaged_config
from ftlab.demo import QUICK, DemoConfig, method_config, plot_demo, run_demo
from ftlab.evaluate import evaluate
from ftlab.zo.trajectory import TrajectoryLog

from run_fixtures import tiny_run_data


def _cfg(out, *extra):
    return load_config(DemoConfig, None, [f"train.output_dir={out}", "train.mode=lora", "train.lora.r=4",
                                          "train.eval_every=0", "train.eval_batch_size=4", "train.checkpoint_every=2",
                                          "mezo.optimizer=mezo", "mezo.steps=3", "mezo.batch_size=2",
                                          "mezo.zo.eps=1e-2", "adamw.steps=2", "adamw.batch_size=2", *extra])


def test_three_rows_their_runs_and_a_rerun_reuses_them(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg, data = _cfg(tmp_path / "demo"), tiny_run_data()
    loads = []

    def load():
        loads.append(1)
        return tiny_model_factory("llama"), tiny_tokenizer
    rows = run_demo(cfg, progress=False, load=load, data=data)
    assert [(r["method"], r["steps"], r["n"]) for r in rows] == [("zero-shot", 0, 4), ("mezo", 3, 4), ("adamw", 2, 4)]
    assert len(loads) == 3  # a fresh model per row: LoRA is injected in place
    reference = evaluate(tiny_model_factory("llama"), tiny_tokenizer, data.spec, data.splits.test, progress=False)
    assert rows[0]["accuracy"] == reference.metrics["accuracy"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["seconds"] > 0 for r in rows)
    assert all(r["peak_mib"] is None or r["peak_mib"] >= 0 for r in rows)
    assert len(list(TrajectoryLog(tmp_path / "demo" / "mezo").steps())) == 3  # MeZO's log; AdamW's checkpoint
    assert (tmp_path / "demo" / "adamw" / "checkpoint").is_dir()
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    # a rerun of the same config reuses every finished row without loading a model
    again = run_demo(cfg, progress=False, load=lambda: pytest.fail("reloaded"), data=data)
    assert json.loads(json.dumps(again)) == saved["rows"]
    pytest.importorskip("matplotlib")
    assert plot_demo(cfg, rows).stat().st_size > 1000


def test_the_packaged_demo_config_and_quick_are_valid():
    cfg = load_config(DemoConfig, packaged_config("demo"))
    mezo, adamw = method_config(cfg, "mezo"), method_config(cfg, "adamw")
    for run in (mezo, adamw):
        run.validate()
        assert (run.mode, run.model, run.data.task) == ("lora", "smollm2-135m", "sentiment")
    assert (mezo.optimizer, adamw.optimizer) == ("mezo", "adamw")
    assert mezo.output_dir.endswith("demo/mezo") and adamw.output_dir.endswith("demo/adamw")
    quick = load_config(DemoConfig, packaged_config("demo"), QUICK)
    assert quick.mezo.steps < cfg.mezo.steps and quick.train.output_dir != cfg.train.output_dir
