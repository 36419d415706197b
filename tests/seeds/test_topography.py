"""The whole topography of a small study on a tiny model: cached pairwise paths, clusters,
prediction, the report; and the straightforward per-pair loop as the reference."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ftlab.config import load_config
from ftlab.errors import FtlabError
from ftlab.seeds import SeedStudyConfig, run_study
from ftlab.seeds.interpolation import interpolation_curve
from ftlab.seeds.topography import TopographyConfig, topography
from ftlab.train import load_run_data

from study_fixtures import task_overrides, write_cue_task

ALPHAS = [0.0, 0.5, 1.0]


def small_cfg(**kw):
    return TopographyConfig(**{"alphas": ALPHAS, "n_train": 12, "n_ood": 10, "batch_size": 8, "group": 2,
                               "surface_points": 3, "hutchinson_samples": 2, "sharpness_steps": 1,
                               "n_curvature": 8, "n_boot": 40, "n_perm": 200, **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir, cue_task):
    """Four trained runs (base, init1, init2, init3) with an OOD file task (read only)."""
    root = tmp_path_factory.mktemp("topo")
    ood = write_cue_task(root / "ood.jsonl", n=30, seed=3)
    cfg = load_config(SeedStudyConfig, None, [
        f"output_dir={root / 'study'}", "kinds=[init]", "runs_per_kind=4", "runs_all=0", f"ood_tasks=[{ood}]",
        "ood_n_test=10", *task_overrides("train.", tiny_model_dir, cue_task), "train.optimizer=adamw",
        "train.lr=3e-2", "train.steps=4", "train.batch_size=4", "train.eval_every=4", "train.lora.r=2"])
    run_study(cfg, progress=False)
    return cfg


def test_topography_report_and_reference_loop(study, tmp_path):
    report = topography(study.output_dir, small_cfg(), tmp_path / "out")
    names = report["names"]
    assert len(names) == 4 and report["base"] == "init0"
    for key, m in report["matrices"].items():
        m = np.asarray(m)
        assert m.shape == (4, 4) and np.all(np.diag(m) == 0) and np.array_equal(m, m.T) and np.all(m >= 0), key
    # Against the straightforward loop (model loaded per pair, every alpha evaluated one by one).
    data = load_run_data(study.train)
    runs = Path(study.output_dir) / "runs"
    ref = interpolation_curve(runs / names[0], runs / names[2], data.spec, data.splits.train[:12], ALPHAS)
    assert report["matrices"]["train_loss"][0][2] == pytest.approx(ref["loss_barrier"], abs=1e-5)
    assert report["matrices"]["train_accuracy"][0][2] == pytest.approx(ref["accuracy_barrier"], abs=1e-9)
    c = report["clustering"]
    assert len(c["labels"]) == 4 and c["n_clusters"] >= 1 and "examples" in c["stability"]
    targets = {r["target"] for r in report["prediction"]}
    assert targets == {*json.loads((Path(study.output_dir) / "study.json").read_text())["ood_tasks"],
                       "in-distribution test"}
    assert report["verdict"].startswith("Basins") and len(report["surface"]["loss"]) == 3
    assert all(np.isfinite(f["sharpness"]) and np.isfinite(f["hessian_trace"]) for f in report["features"].values())
    for name in ("report.md", "report.json", "heatmap.png", "surface.png", "prediction.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Verdict" in md and "Spearman rho" in md and "4 runs" in md
    # Cached per pair and per run: a rerun recomputes nothing.
    cache = Path(study.output_dir) / "topography"
    files = sorted(cache.glob("pairs/*.json")) + sorted(cache.glob("runs/*.json"))
    assert len(files) == 6 + 4
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = topography(study.output_dir, small_cfg(), tmp_path / "out2")
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert again["matrices"] == report["matrices"]


def test_runs_of_other_trainable_sets_or_too_few_runs_are_refused(study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study.output_dir, copy, ignore=shutil.ignore_patterns("topography", ".ftlab.lock"))
    cfg_path = copy / "runs" / "init2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"]["r"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FtlabError, match="different models or trainable sets"):
        topography(copy, small_cfg(), tmp_path / "out")
    for name in ("init1", "init2"):
        (copy / "runs" / name / "seed_run.json").unlink()
    with pytest.raises(FtlabError, match="at least 3 runs"):
        topography(copy, small_cfg(), tmp_path / "out")
    with pytest.raises(FtlabError, match="alphas"):
        topography(study.output_dir, small_cfg(alphas=[0.0, 0.5]), tmp_path / "out")


def _rank_worker(rank: int, study_dir: str, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    report = topography(study_dir, small_cfg(surface_points=2), out)
    assert (report is None) == (rank != 0)
    dist.destroy_process_group()


def test_ranks_take_pairs_under_torchrun(study, tmp_path):
    import socket

    import torch.multiprocessing as mp

    copy = tmp_path / "copy"
    shutil.copytree(study.output_dir, copy, ignore=shutil.ignore_patterns("topography", ".ftlab.lock"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(str(copy), port, str(tmp_path / "out")), nprocs=2, join=True)
    names = sorted(p.name for p in (copy / "runs").iterdir())
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    for k, (a, b) in enumerate(pairs):
        assert json.loads((copy / "topography" / "pairs" / f"{a}--{b}.json").read_text())["rank"] == k % 2
    for k, n in enumerate(names):
        assert json.loads((copy / "topography" / "runs" / f"{n}.json").read_text())["rank"] == k % 2
    one = topography(study.output_dir, small_cfg(surface_points=2), tmp_path / "single")
    two = json.loads((tmp_path / "out" / "report.json").read_text())
    np.testing.assert_allclose(np.asarray(two["matrices"]["train_loss"]), np.asarray(one["matrices"]["train_loss"]),
                               atol=1e-6)


def test_run_weights_are_the_kept_ones(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ftlab.config import TrainConfig
    from ftlab.rundir import RunDir
    from ftlab.seeds.topography import run_weights

    run = RunDir(tmp_path / "run")
    run.checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(run.best))
    save_file({"w": torch.ones(1)}, str(run.checkpoint_weights))
    run.checkpoint_state.write_text(json.dumps({"step": 4}))
    keep_best = load_config(TrainConfig, None, ["steps=4", "eval_every=2", "data.n_dev=8", "keep=best"])
    with_dev = load_config(TrainConfig, None, ["steps=4", "eval_every=2", "data.n_dev=8"])
    no_dev = load_config(TrainConfig, None, ["steps=4", "eval_every=0"])
    assert run_weights(run.path, keep_best)["w"].item() == 0  # the best, not the end
    assert run_weights(run.path, with_dev)["w"].item() == 1  # keep=last (the default): the end
    assert run_weights(run.path, no_dev)["w"].item() == 1  # no dev selection: the final checkpoint
    # A finished run: what its results.json says model/ holds, whatever the config asks.
    run.results.write_text(json.dumps({"model": "best"}))
    assert run_weights(run.path, with_dev)["w"].item() == 0
    run.results.write_text(json.dumps({"model": "last"}))
    assert run_weights(run.path, keep_best)["w"].item() == 1
    run.results.write_text(json.dumps({"best_step": 2}))  # before ftlab recorded it: the best was kept
    assert run_weights(run.path, with_dev)["w"].item() == 0
    run.results.unlink()
    run.best.unlink()
    assert run_weights(run.path, keep_best)["w"].item() == 1
    cut = load_config(TrainConfig, None, ["steps=6", "eval_every=2", "keep=best"])  # the checkpoint is not the end
    with pytest.raises(FtlabError, match=r"no final checkpoint at step 6 nor best.safetensors; train it to the end"):
        run_weights(run.path, cut)


def test_interpolation_needs_the_kept_weights_of_both_runs(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ftlab.config import TrainConfig, to_dict
    from ftlab.rundir import RunDir

    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    for run in (a, b):
        run.checkpoint.mkdir(parents=True)
        run.config.write_text(json.dumps(to_dict(TrainConfig(keep="best"))))
        save_file({"w": torch.ones(1)}, str(run.checkpoint_weights))  # not at the last step
    save_file({"w": torch.zeros(1)}, str(a.best))
    with pytest.raises(FtlabError, match=r"/b: no final checkpoint at step 200 nor best.safetensors; train it to "
                                         "the end"):
        interpolation_curve(a.path, b.path, None, [])
