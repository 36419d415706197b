"""The Local SGD experiment on a tiny model under 2 gloo processes: the runs it plans, equal
samples for every variant, communication rounds, intervals, and the refusals."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from seeds.study_fixtures import task_overrides

from ftlab.config import load_config
from ftlab.errors import FtlabError
from ftlab.scaling.local_sgd import LocalSGDExperimentConfig, run_configs, run_local_sgd_experiment


def _exp(out, model="m", task="t", *extra):
    return load_config(LocalSGDExperimentConfig, None, [
        f"output_dir={out}", *task_overrides("train.", model, task), "train.optimizer=sgd", "train.lr=0.3",
        "train.schedule=cosine", "train.steps=6", "train.batch_size=4", "train.eval_every=3",
        "train.max_grad_norm=null", "period=2", "alpha=0.45", "seeds=[0, 1]", *extra])


def test_planned_runs(tmp_path):
    configs = run_configs(_exp(tmp_path))
    assert sorted(configs) == [(v, s) for v in ("constant", "quadratic", "sync") for s in (0, 1)]
    assert configs[("sync", 0)].local_sgd.period is None
    assert configs[("constant", 1)].local_sgd.period == 2 and configs[("constant", 1)].local_sgd.rule == "constant"
    q = configs[("quadratic", 0)].local_sgd
    assert (q.period, q.rule, q.alpha) == (2, "quadratic", 0.45)
    assert all(c.batch_size == 4 and c.steps == 6 for c in configs.values())  # equal samples


@pytest.mark.parametrize("extra, match", [(["period=0"], r"local_sgd.period: must be >= 1"),
                                          (["alpha=null"], "the quadratic rule needs alpha > 0"),
                                          (["train.optimizer=mezo"], "Local SGD is first order"),
                                          (["variants=[constant]"], "sync included")])
def test_bad_experiments(tmp_path, extra, match):
    with pytest.raises(FtlabError, match=match):
        run_configs(_exp(tmp_path, "m", "t", *extra))


def test_one_process_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(FtlabError, match="needs several processes: launch it with torchrun"):
        run_local_sgd_experiment(_exp(tmp_path / "exp"), progress=False)


def _worker(rank, out, model, task):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=2)
    try:
        result = run_local_sgd_experiment(_exp(out, model, task), progress=False)
        if rank == 0:
            Path(out, "returned.json").write_text(json.dumps(result))
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


def test_experiment_on_two_processes(tmp_path, tiny_model_dir, cue_task):
    out = tmp_path / "exp"
    mp.spawn(_worker, args=(str(out), tiny_model_dir, cue_task), nprocs=2)
    result = json.loads((out / "local_sgd.json").read_text())
    assert result["world"] == 2 and result["samples"] == 24
    # sync: one all-reduce a step; constant H=2: averages after steps 2, 4, 6; the QSR's H starts at
    # max(2, floor((0.45 / 0.3)^2)) = 2, then at step 2 (lr 0.225) floor((0.45 / 0.225)^2) = 4: averages after 2, 6
    assert result["comm_rounds"]["sync"]["mean"] == 6 and result["comm_rounds"]["constant"]["mean"] == 3
    assert result["comm_rounds"]["quadratic"]["mean"] == 2
    assert result["rounds_vs_sync"]["constant"] == 0.5
    hs = [json.loads(line).get("H") for line in (out / "quadratic/seed0/metrics.jsonl").read_text().splitlines()]
    assert [h for h in hs if h is not None] == [2, 4, 4, 4, 4, 4]  # H after each step: the next round's
    for v in ("constant", "quadratic"):
        d = result["distance_to_sync"][v]["dev_loss_mean_abs"]
        assert d["n"] == 2 and d["mean"] > 0
    assert set(result["test"]) == {"sync", "constant", "quadratic"}
    assert (out / "local_sgd.png").stat().st_size > 10_000
