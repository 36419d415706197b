"""The training loop: learning, exact resume after a kill, refusing mismatched or NaN runs."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from ftlab.config import TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.models import load_model
from ftlab.optim import lr_factor, param_groups
from ftlab.tasks import Splits
from ftlab.tasks.base import Example, TaskSpec
from ftlab.train import RunData, batch_indices, replay_run, train
from ftlab.zo.trajectory import RECORD, TrajectoryLog, pack_record

FILLER = ["the", "movie", "story", "was", "a", "film", "and", "it", "acting", "plot"]


def _synthetic(n, seed):
    """Sentences whose label is given by one cue word: learnable by a tiny model."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [["terrible", "great"][label]]
        rng.shuffle(words)
        out.append(Example(id=f"s:{seed}:{i}", fields={"text": " ".join(words)}, label=label))
    return out


def _data():
    spec = TaskSpec(name="synthetic", template="{text} It was", options=[" terrible", " great"])
    return RunData(spec, Splits(train=_synthetic(32, 1), dev=_synthetic(16, 2), test=_synthetic(16, 3)))


def _cfg(tmp_path, *overrides):
    return load_config(TrainConfig, None, [f"output_dir={tmp_path}", "steps=6", "batch_size=4",
                                           "eval_every=3", "checkpoint_every=2", "lr=1e-3",
                                           "eval_batch_size=8", *overrides])


class _Killed(Exception):
    pass


def _saved_tensors(run_dir):
    """Every tensor a run saved: its best trainable tensors and its final model/ output."""
    files = [run_dir / "best.safetensors", *sorted((run_dir / "model").glob("*.safetensors"))]
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("mode,optimizer", [("full", "adamw"), ("lora", "sgd"), ("prefix", "adamw"),
                                            ("full", "mezo"), ("lora", "mezo")])
def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_model_factory, tiny_tokenizer, mode, optimizer):
    overrides = [f"mode={mode}", f"optimizer={optimizer}", "schedule=linear", "lora.r=2", "prefix.num_tokens=2"]
    straight = train(_cfg(tmp_path / "a", *overrides), progress=False,
                     model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    want = _saved_tensors(tmp_path / "a")
    cfg = _cfg(tmp_path / "b", *overrides)

    def kill(step, record):
        if step == 5:  # after the step-4 checkpoint: step 5 must be redone on resume
            raise _Killed

    with pytest.raises(_Killed):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=_data(), callback=kill)
    assert not (tmp_path / "b" / "results.json").exists()
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "spl')  # a line the kill cut in half
    resumed = train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
                    data=_data())
    got = _saved_tensors(tmp_path / "b")
    assert got.keys() == want.keys() and len(want) > 1
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert resumed == straight
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed step-5 line was replaced, not duplicated
    if optimizer == "mezo":  # the checkpoint is the trajectory log: a header + 20 bytes a step, no weights
        log = (tmp_path / "b" / "trajectory.bin").read_bytes()
        header = TrajectoryLog(tmp_path / "b").header_size
        assert log == (tmp_path / "a" / "trajectory.bin").read_bytes() and len(log) == header + 6 * RECORD.size
        assert not (tmp_path / "b" / "checkpoint" / "trainable.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # in place / exact mode
def test_replay_rebuilds_a_mezo_run_bitwise(tmp_path, tiny_model_factory, tiny_tokenizer, dtype):
    base = tmp_path / "base"
    tiny_model_factory("llama").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    cfg = _cfg(tmp_path / "run", f"model={base}", "optimizer=mezo", "eval_every=0", "steps=8", f"dtype={dtype}",
               "zo.n_perturbations=2", "weight_decay=0.01", "schedule=cosine", "zo.eps=1e-2")
    model, tokenizer = load_model(str(base), dtype=dtype)
    train(cfg, progress=False, model_and_tokenizer=(model, tokenizer), data=_data())
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    replayed, _ = replay_run(tmp_path / "run")
    for name, p in replayed.named_parameters():
        assert torch.equal(p, trained[name]), name
    halfway, _ = replay_run(tmp_path / "run", steps=4)
    assert any(not torch.equal(p, trained[n]) for n, p in halfway.named_parameters())


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "cut", "torn"])
def test_a_damaged_trajectory_log_is_reported_and_left_alone(tmp_path, tiny_model_factory, tiny_tokenizer, damage):
    cfg = _cfg(tmp_path, "optimizer=mezo", "eval_every=0")

    def kill(step, record):
        if step == 5:
            raise _Killed
    with pytest.raises(_Killed):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=_data(), callback=kill)
    log = tmp_path / "trajectory.bin"
    data = bytearray(log.read_bytes())
    second = TrajectoryLog(tmp_path).header_size + RECORD.size  # the second record (step 1)
    if damage == "corrupt":
        data[second + 4:second + 8] = b"\xff\xff\xff\xff"  # its seed: the checksum no longer matches
    elif damage == "foreign":
        data[second:second + RECORD.size] = pack_record(1, 0xFFFFFFFF, 0.5, 1e-3)  # a valid record of other seeds
    else:
        data = data[:second + (0 if damage == "cut" else 7)]  # one step left; the checkpoint is at step 4
    log.write_bytes(bytes(data))
    match = {"corrupt": r"record 1 \(step 1 as stored\) is damaged \(checksum mismatch\)",
             "foreign": "another run", "cut": "holds 1 steps", "torn": "holds 1 steps"}[damage]
    with pytest.raises(FtlabError, match=match):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=_data())
    assert log.read_bytes() == bytes(data)


def test_training_learns_a_cue_word(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg = _cfg(tmp_path, "steps=40", "eval_every=20", "checkpoint_every=0", "lr=3e-3")
    model = tiny_model_factory("llama")
    results = train(cfg, progress=False, model_and_tokenizer=(model, tiny_tokenizer), data=_data())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert results["test"]["accuracy"] >= 0.9
    dev = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "dev"]
    assert [d["step"] for d in dev] == [0, 20, 40]
    assert results["best_dev"] == max(d["accuracy"] for d in dev)


def test_other_config_refuses_to_resume(tmp_path, tiny_model_factory, tiny_tokenizer):
    train(_cfg(tmp_path, "steps=2"), progress=False,
          model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    with pytest.raises(FtlabError, match="holds a run written with other settings"):
        train(_cfg(tmp_path, "steps=2", "lr=0.5"), progress=False,
              model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())


def test_nan_loss_stops_with_a_clear_error(tmp_path, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FtlabError, match="loss became nan at step 0"):
        train(_cfg(tmp_path, "eval_every=0"), progress=False, model_and_tokenizer=(model, tiny_tokenizer),
              data=_data())
    assert not (tmp_path / "checkpoint").exists()


def test_mezo_skips_non_finite_steps_then_stops(tmp_path, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    cfg = _cfg(tmp_path, "eval_every=0", "optimizer=mezo", "max_skipped_steps=3", "checkpoint_every=1")
    with pytest.raises(FtlabError, match="loss became nan at step 3 \\(4 non-finite"):
        train(cfg, progress=False, model_and_tokenizer=(model, tiny_tokenizer), data=_data())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == ["non-finite loss"] * 3
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["skipped"] == 3


def test_batches_cover_each_epoch_once_and_are_pure():
    n, bs = 10, 4
    stream = [i for s in range(5) for i in batch_indices(n, bs, seed=7, step=s)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(n, bs, seed=7, step=3) == stream[12:16]
    assert batch_indices(n, bs, seed=8, step=0) != batch_indices(n, bs, seed=7, step=0)


def test_lr_schedules():
    assert lr_factor("constant", 50, 100) == 1.0
    assert lr_factor("linear", 25, 100) == pytest.approx(0.75)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("linear", 0, 100, warmup=10) == pytest.approx(0.1)
    with pytest.raises(FtlabError):
        lr_factor("exp", 1, 10)


def test_no_weight_decay_on_biases_and_norms(tiny_model_factory):
    model = tiny_model_factory("llama")
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decayed["params"])
    assert any("norm" in names[id(p)] for p in plain["params"])


def test_accuracy_objective_needs_and_drives_mezo(tmp_path, tiny_model_factory, tiny_tokenizer):
    with pytest.raises(FtlabError, match="has no gradient"):
        train(_cfg(tmp_path / "fo", "objective=accuracy"), progress=False,
              model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    train(_cfg(tmp_path / "zo", "objective=accuracy", "optimizer=mezo", "zo.eps=0.01"), progress=False,
          model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "zo" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert len(losses) == 6 and all(-1.0 <= x <= 0.0 for x in losses)  # minus a batch accuracy


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_offloaded_training_equals_exact_mezo_and_resumes(tmp_path, tiny_model_factory, tiny_tokenizer, mode):
    """``offload=true`` (blocks in CPU memory, lockstep halves; compute device = CPU here) trains
    the same run as exact-mode MeZO: same trajectory, dev scores and saved tensors; a killed
    offloaded run resumes to the same weights, and its log replays with plain MeZO."""
    common = [f"mode={mode}", "optimizer=mezo", "lora.r=2", "weight_decay=0.1", "zo.eps=1e-2"]
    plain = train(_cfg(tmp_path / "plain", *common, "zo.exact=true"), progress=False,
                  model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    offloaded = train(_cfg(tmp_path / "off", *common, "offload=true"), progress=False,
                      model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    assert offloaded == plain
    from ftlab.zo.trajectory import TrajectoryLog

    want = [(s, r.seeds, r.grads) for s, r in TrajectoryLog(tmp_path / "plain").steps()]
    assert [(s, r.seeds, r.grads) for s, r in TrajectoryLog(tmp_path / "off").steps()] == want
    a, b = _saved_tensors(tmp_path / "plain"), _saved_tensors(tmp_path / "off")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def kill_at_4(step, record):
        if step == 4:
            raise _Killed
    cfg = _cfg(tmp_path / "killed", *common, "offload=true")
    with pytest.raises(_Killed):
        train(cfg, progress=False, callback=kill_at_4,
              model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    resumed = train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
                    data=_data())
    assert resumed == plain
    c = _saved_tensors(tmp_path / "killed")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_offload_without_the_host_memory_is_refused_before_loading(tmp_path, tiny_model_factory, tiny_tokenizer,
                                                                   monkeypatch):
    import ftlab.zo.offload as offload

    folder = tmp_path / "base"
    tiny_model_factory("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    monkeypatch.setattr(offload, "available_host_bytes", lambda: 1000)
    loaded = []
    monkeypatch.setattr("ftlab.parallel.load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(FtlabError, match=r"offload needs .* GiB of CPU memory .* only 0.0 GiB is available"):
        train(_cfg(tmp_path / "run", f"model={folder}", "optimizer=mezo", "offload=true"), progress=False,
              data=_data())
    assert not loaded
