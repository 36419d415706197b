"""Every zeroth-order optimizer a config can name trains through ``ftlab train``'s loop: a killed
run resumes to the same weights as a straight one, and a run replays bitwise from its trajectory
log where the optimizer's state allows (else the replay is refused in one line and the run is
checkpointed as tensors). The settings each estimator requires are refused up front otherwise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import _cfg, _data, _Killed

from ftlab.errors import FtlabError
from ftlab.models import load_model
from ftlab.optim import build_optimizer
from ftlab.train import replay_run, train
from ftlab.zo import ZO_OPTIMIZERS

# What an estimator needs beyond the defaults (its config rule says so otherwise).
REQUIRED = {
    "fzoo": ["zo.distribution=rademacher", "zo.n_perturbations=2"],
    "lowrank-fzoo": ["zo.n_perturbations=2"],
    "mezo-svrg": ["zo.svrg_every=3", "zo.svrg_batch=8"],  # a kill at step 5 falls between anchors (3 and 6)
}
BATCHED = ["optimizer=fzoo", "mode=lora", "zo.batched=true", *REQUIRED["fzoo"]]
LOWRANK_BATCHED = ["optimizer=lowrank-fzoo", "mode=lora", "zo.batched=true", *REQUIRED["lowrank-fzoo"]]
# Buffers, n-SPSA, weight decay and a schedule through a kill and a replay.
ZO_ADAM = ["optimizer=zo-adam", "zo.n_perturbations=2", "zo.betas=[0.8, 0.95]", "weight_decay=0.01", "schedule=cosine"]
ZO_GUIDED = ["optimizer=zo-guided", "zo.pool_size=3", "weight_decay=0.01", "schedule=cosine"]


def _final_tensors(run_dir):
    return {k: v for f in sorted((run_dir / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_every_name_builds_its_class(tmp_path, tiny_model):
    for name, entry in ZO_OPTIMIZERS.items():
        cfg = _cfg(tmp_path, f"optimizer={name}", *REQUIRED.get(name, []))
        optimizer = build_optimizer(cfg, tiny_model)
        assert type(optimizer) is entry.cls
        assert optimizer.forwards_per_step >= 2 and optimizer.extra_bytes_per_entry >= 0
        assert type(optimizer).__name__ in optimizer.cost()


@pytest.mark.parametrize("overrides", [[f"optimizer={name}", *REQUIRED.get(name, [])] for name in ZO_OPTIMIZERS]
                         + [BATCHED, LOWRANK_BATCHED, ZO_ADAM, ZO_GUIDED],
                         ids=[*ZO_OPTIMIZERS, "fzoo-batched", "lowrank-fzoo-batched", "zo-adam-tuned",
                              "zo-guided-tuned"])
def test_trains_resumes_and_replays_or_refuses(tmp_path, base, overrides):
    overrides = [f"model={base}", "zo.eps=1e-2", "eval_every=0", *overrides]  # no eval: the final weights are kept
    model, tokenizer = load_model(str(base))
    straight = train(_cfg(tmp_path / "a", *overrides), progress=False, model_and_tokenizer=(model, tokenizer),
                     data=_data())
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = {n: p for n, p in load_model(str(base))[0].named_parameters()}
    assert any(not torch.equal(trained[n], start[n]) for n in start if n in trained) or \
        any("lora" in n for n in trained)  # full fine-tuning moved the weights (LoRA: the adapters, in model/)

    def kill(step, record):
        if step == 5:  # after the step-4 checkpoint
            raise _Killed

    cfg = _cfg(tmp_path / "b", *overrides)
    with pytest.raises(_Killed):
        train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=_data(), callback=kill)
    resumed = train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=_data())
    want, got = _final_tensors(tmp_path / "a"), _final_tensors(tmp_path / "b")
    assert got.keys() == want.keys() and want
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert resumed == straight

    optimizer = build_optimizer(cfg, load_model(str(base))[0])
    if optimizer.replayable:  # the resumed run wrote the straight run's log, byte for byte
        assert (tmp_path / "b" / "trajectory.bin").read_bytes() == (tmp_path / "a" / "trajectory.bin").read_bytes()
        replayed, _ = replay_run(tmp_path / "a")
        for name, p in replayed.named_parameters():
            if name in trained:
                assert torch.equal(p, trained[name]), name
    else:
        assert not (tmp_path / "a" / "trajectory.bin").exists()
        with pytest.raises(FtlabError, match="cannot be replayed"):
            replay_run(tmp_path / "a")


@pytest.mark.parametrize("overrides,match", [
    (["optimizer=fzoo"], "set zo.distribution=rademacher zo.n_perturbations=8"),
    (["optimizer=hizoo", "zo.one_sided=true"], "zo.one_sided=false zo.distribution=gaussian"),
    (["optimizer=mezo", "zo.batched=true", "mode=lora"], "needs optimizer=fzoo or lowrank-fzoo"),
    ([*BATCHED, "mode=full"], "mode=lora or prefix"),
    (["optimizer=hizoo", "zo.hessian_smoothing=0"], r"zo.hessian_smoothing: must be in \(0, 1\)"),
    (["optimizer=mezo-svrg", "zo.svrg_every=0"], r"zo.svrg_every: must be >= 1"),
    (["optimizer=mezo-svrg", "zo.svrg_batch=0"], r"zo.svrg_batch: must be >= 1 \(examples in the full-batch"),
])
def test_an_estimator_missing_its_settings_is_refused_in_one_line(tmp_path, overrides, match):
    with pytest.raises(FtlabError, match=match) as info:
        _cfg(tmp_path, *overrides)
    assert "\n" not in str(info.value)


def test_show_config_states_each_estimators_cost(tmp_path):
    from ftlab.cli.common import optimizer_cost

    for name in ZO_OPTIMIZERS:
        cost = optimizer_cost(_cfg(tmp_path, f"optimizer={name}", *REQUIRED.get(name, [])))
        assert "forwards a step" in cost and "extra bytes" in cost
    assert optimizer_cost(_cfg(tmp_path, "optimizer=adamw")) is None
    assert optimizer_cost(_cfg(tmp_path, "optimizer=fzoo", *REQUIRED["fzoo"])).startswith("FZOO: 3 forwards")


def test_a_run_written_before_the_new_knobs_resumes(tmp_path, base):
    """A config.json without the estimators' knobs (written by an earlier version) resumes: a
    missing key is read as its default, not as other settings."""
    import json

    overrides = [f"model={base}", "optimizer=mezo", "zo.eps=1e-2", "eval_every=0"]

    def kill(step, record):
        if step == 5:
            raise _Killed

    cfg = _cfg(tmp_path / "old", *overrides)
    with pytest.raises(_Killed):
        train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=_data(), callback=kill)
    config = tmp_path / "old" / "config.json"
    written = json.loads(config.read_text())
    for key in ("batched", "hessian_smoothing", "rank", "refresh_every", "pool_size", "elite_fraction", "svrg_every",
                "svrg_batch", "svrg_full_lr_scale"):
        del written["zo"][key]
    config.write_text(json.dumps(written))
    resumed = train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=_data())
    straight = train(_cfg(tmp_path / "new", *overrides), progress=False, model_and_tokenizer=load_model(str(base)),
                     data=_data())
    assert resumed == straight
