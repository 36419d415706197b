"""The seed grid: separate seed kinds, the plan, resumable runs, and refusing mixed studies."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ftlab.config import TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.models import trainable_parameters
from ftlab.seeds import SeedStudyConfig, check_comparable, plan_runs, run_study, study_train_config
from ftlab.train import batch_indices, build_trainer

from study_fixtures import task_overrides


def _trainable(cfg, tiny_model_factory):
    module, optimizer, _ = build_trainer(cfg, tiny_model_factory("llama"))
    return {n: p.detach().clone() for n, p in trainable_parameters(module)}, optimizer


def test_seed_kinds_drive_separate_sources_of_randomness(tiny_model_factory):
    base = TrainConfig(mode="lora", optimizer="mezo", seed=0)
    ref, ref_opt = _trainable(base, tiny_model_factory)
    for kind in ("order", "init", "zo"):
        cfg = TrainConfig(mode="lora", optimizer="mezo", seed=0, **{f"{kind}_seed": 7})
        params, opt = _trainable(cfg, tiny_model_factory)
        same_init = all(torch.equal(params[n], ref[n]) for n in ref)
        assert same_init == (kind != "init"), kind
        assert (opt.draw_seeds() == _trainable(base, tiny_model_factory)[1].draw_seeds()) == (kind != "zo"), kind
        same_order = batch_indices(64, 8, cfg.seed_of("order"), 0) == batch_indices(64, 8, base.seed_of("order"), 0)
        assert same_order == (kind != "order"), kind
    assert TrainConfig(seed=3).seed_of("init") == 3  # None falls back to the one seed


def test_plan_varies_one_kind_at_a_time_and_all_at_once():
    runs = plan_runs(SeedStudyConfig(kinds=["order", "init", "zo"], runs_per_kind=3, runs_all=3,
                                     train=TrainConfig(optimizer="mezo")))
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 1 + 3 * 2 + 2  # the base run is shared
    by_name = {r.name: r for r in runs}
    assert set(by_name["order0-init0-zo0"].groups) == {"order", "init", "zo", "all"}
    assert by_name["order2-init0-zo0"].groups == ("order",)
    assert by_name["order2-init2-zo2"].groups == ("all",)
    for run in runs:
        if run.groups == ("init",):
            assert dict(run.seeds)["order"] == dict(run.seeds)["zo"] == 0 != dict(run.seeds)["init"]


@pytest.mark.parametrize("kw,match", [(dict(kinds=["order", "weather"]), "distinct seed kinds"),
                                      (dict(kinds=["zo"]), "needs a zeroth-order optimizer"),
                                      (dict(runs_per_kind=1, runs_all=1), "at least|>= 2")])
def test_bad_grids(kw, match):
    with pytest.raises(FtlabError, match=match):
        plan_runs(SeedStudyConfig(**kw))


def test_runs_that_disagree_on_task_or_model_are_refused():
    a, b = TrainConfig(), TrainConfig()
    b.data.task = "trec"
    with pytest.raises(FtlabError, match="disagree on task"):
        check_comparable({"a": a, "b": b})
    with pytest.raises(FtlabError, match="disagree on model"):
        check_comparable({"a": a, "b": TrainConfig(model="gemma3-270m")})


def _study(tmp_path, model, task, *extra):
    return load_config(SeedStudyConfig, None, [
        f"output_dir={tmp_path / 'study'}", "runs_per_kind=2", "runs_all=2", *task_overrides("train.", model, task),
        "train.optimizer=adamw", "train.lr=1e-2", "train.steps=2", "train.batch_size=4", "train.eval_every=2",
        "train.checkpoint_every=2", *extra])


def test_study_runs_are_resumable_and_never_redone(tmp_path, tiny_model_dir, cue_task):
    study = _study(tmp_path, tiny_model_dir, cue_task)
    done = []
    records = run_study(study, progress=False, on_run=lambda run, record: done.append(run.name))
    assert sorted(done) == sorted(r.name for r in plan_runs(study)) and len(done) == 4
    for r in records:
        assert len(r["test_scores"]) == 24 and set(r["test_scores"]) <= {0.0, 1.0}
        assert r["test"]["accuracy"] == pytest.approx(sum(r["test_scores"]) / 24)
        cfg = json.loads((tmp_path / "study" / "runs" / r["name"] / "config.json").read_text())
        assert (cfg["order_seed"], cfg["init_seed"]) == (r["seeds"]["order"], r["seeds"]["init"])
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "runs").glob("*/seed_run.json")}
    # Growing the grid trains only the new runs; finished runs' files are not touched.
    bigger = _study(tmp_path, tiny_model_dir, cue_task, "runs_all=3")
    again = []
    records = run_study(bigger, progress=False, on_run=lambda run, record: again.append(run.name))
    assert again == ["order2-init2"] and len(records) == 5
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    summary = json.loads((tmp_path / "study" / "results.json").read_text())
    assert len(summary["runs"]) == 5


def test_a_study_folder_refuses_another_study(tmp_path, tiny_model_dir, cue_task):
    run_study(_study(tmp_path, tiny_model_dir, cue_task, "runs_per_kind=2", "runs_all=0", "kinds=[order]"),
              progress=False)
    with pytest.raises(FtlabError, match="whose train differ"):
        run_study(_study(tmp_path, tiny_model_dir, cue_task, "runs_all=0", "kinds=[order]", "train.lr=0.5"),
                  progress=False)
    with pytest.raises(FtlabError, match="disagree on task"):
        run_study(_study(tmp_path, tiny_model_dir, cue_task, "runs_all=0", "kinds=[order]",
                         "train.data.task=sentiment"), progress=False)


def test_run_config_sets_seeds_and_folder(tmp_path):
    study = SeedStudyConfig(output_dir=str(tmp_path))
    run = plan_runs(study)[-1]
    cfg = study_train_config(study, run)
    assert cfg.output_dir == str(tmp_path / "runs" / run.name)
    assert (cfg.order_seed, cfg.init_seed, cfg.zo_seed, cfg.seed) == (4, 4, None, 0)


def _rank_worker(rank: int, study: dict, port: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    from ftlab.config import from_dict

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    done = []
    run_study(from_dict(SeedStudyConfig, study), progress=False, on_run=lambda run, record: done.append(run.name))
    assert os.environ["WORLD_SIZE"] == "2"  # hidden from ftlab.train during the runs only
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(done))
    dist.destroy_process_group()


def test_ranks_split_the_runs(tmp_path, tiny_model_dir, cue_task):
    import socket

    import torch.multiprocessing as mp

    from ftlab.config import to_dict

    study = _study(tmp_path, tiny_model_dir, cue_task, "kinds=[order]", "runs_all=0", "train.steps=1",
                   "train.eval_every=2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(to_dict(study), port, str(tmp_path)), nprocs=2, join=True)
    names = [r.name for r in plan_runs(study)]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == names[rank::2]
    assert [r["name"] for r in json.loads((tmp_path / "study" / "results.json").read_text())["runs"]] == sorted(names)


def test_every_run_is_evaluated_out_of_distribution(tmp_path, tiny_model_dir, cue_task):
    from study_fixtures import write_cue_task

    ood_a = write_cue_task(tmp_path / "ood_a.jsonl", n=40, seed=1)
    ood_b = write_cue_task(tmp_path / "ood_b.jsonl", n=30, seed=2)
    study = _study(tmp_path, tiny_model_dir, cue_task, "kinds=[init]", "runs_all=0", f"ood_tasks=[{ood_a}]",
                   "ood_n_test=16")
    records = run_study(study, progress=False)
    ids = {tuple(r["ood"][ood_a]["ids"]) for r in records}
    assert len(ids) == 1 and len(next(iter(ids))) == 16  # the same 16 OOD examples for every run
    for r in records:
        res = r["ood"][ood_a]
        assert set(res["scores"]) <= {0.0, 1.0} and res["metrics"]["accuracy"] == pytest.approx(np.mean(res["scores"]))
    # A task added later is evaluated on the finished runs without retraining them.
    models = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "runs").glob("*/model/*")}
    trained = []
    bigger = _study(tmp_path, tiny_model_dir, cue_task, "kinds=[init]", "runs_all=0", f"ood_tasks=[{ood_a}, {ood_b}]",
                    "ood_n_test=16")
    records = run_study(bigger, progress=False, on_run=lambda run, record: trained.append(run.name))
    assert trained == [] and all(set(r["ood"]) == {ood_a, ood_b} for r in records)
    assert all(p.stat().st_mtime_ns == t for p, t in models.items())


def test_ood_task_with_other_label_words_is_refused(tmp_path, tiny_model_dir, cue_task):
    # The built-in entailment tasks answer " Yes"/" No"; the study's cue task " terrible"/" great".
    study = _study(tmp_path, tiny_model_dir, cue_task, "kinds=[init]", "runs_all=0",
                   "ood_tasks=[factual_summary]")
    with pytest.raises(FtlabError, match="label words"):
        run_study(study, progress=False)
    assert not (tmp_path / "study" / "runs").exists()  # refused before any training
    with pytest.raises(FtlabError, match="distinct tasks other than"):
        run_study(_study(tmp_path, tiny_model_dir, cue_task, f"ood_tasks=[{cue_task}]"), progress=False)


def test_the_sentiment_domains_are_ood_tests_of_sentiment():
    """The packaged OOD study's tasks: tweets, Amazon and NYT snippets share sentiment's prompt and
    label words, so they are accepted and drawn the same for every run (data_seed)."""
    from ftlab.configs import packaged_config
    from ftlab.seeds.runner import ood_sets
    from ftlab.tasks import get_spec

    study = load_config(SeedStudyConfig, packaged_config("seeds-sentiment-ood"), ["ood_n_test=16"])
    assert study.train.data.task == "sentiment" and len(plan_runs(study)) == 16
    sets = ood_sets(study, get_spec("sentiment"))
    assert list(sets) == ["sentiment_tweets", "sentiment_amazon", "sentiment_nyt"]
    for task, (spec, examples) in sets.items():
        assert spec.template == get_spec("sentiment").template and spec.options == [" negative", " positive"]
        assert len(examples) == 16 and len({e.id for e in examples}) == 16
        assert all(e.id.startswith(f"{task}:") for e in examples)
        assert {e.label for e in examples} == {0, 1}
    again = ood_sets(study, get_spec("sentiment"))["sentiment_nyt"][1]
    assert [e.id for e in again] == [e.id for e in sets["sentiment_nyt"][1]]


def test_ranks_join_through_init_from_env_and_share_gpus_over_gloo(monkeypatch):
    from ftlab.seeds import runner

    joined, current = [], []
    monkeypatch.setattr(runner, "init_from_env", lambda device: joined.append(device) or (1, 4))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runner.join_ranks("cuda") == (1, 4) and joined == ["cuda"]  # a GPU each: NCCL
    assert runner.join_ranks("cpu") == (1, 4) and joined[-1] == "cpu"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # more ranks on this host than GPUs: they share
    assert runner.join_ranks("cuda") == (1, 4) and joined[-1] == "cpu"  # gloo: NCCL refuses a shared GPU
    monkeypatch.setenv("LOCAL_RANK", "2")
    runner.use_rank_gpu("cuda")
    runner.use_rank_gpu("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    runner.use_rank_gpu("cuda")  # one process: the device is left as it is
    assert current == [0]  # round-robin: local rank 2 of 2 GPUs takes GPU 0


def test_a_study_written_with_the_old_default_output_dir_resumes(tmp_path):
    """Before run folders were named from the config, a study's train section stored
    output_dir "runs/default"; the study never uses it (each run has its own folder), so the same
    study resumes, while a study whose train settings really differ is still refused."""
    import dataclasses
    import json

    from ftlab.config import TrainConfig, to_dict
    from ftlab.errors import FtlabError
    from ftlab.seeds.runner import SeedStudyConfig, _prepare_study

    study = SeedStudyConfig(train=TrainConfig(eval_every=0), output_dir=str(tmp_path))
    stored = to_dict(study)
    stored["train"]["output_dir"] = "runs/default"
    (tmp_path / "study.json").write_text(json.dumps(stored))
    assert _prepare_study(study, main=False) == tmp_path
    other = dataclasses.replace(study, train=dataclasses.replace(study.train, lr=study.train.lr * 2))
    with pytest.raises(FtlabError, match="train differ"):
        _prepare_study(other, main=False)
