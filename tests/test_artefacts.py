"""What a run's model/ holds (the final weights, or the best dev step's with keep=best) and
whether a saved adapter or prefix is portable: loadable with plain transformers/peft from another
folder, naming its base without a machine-local path, refused on another base."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ftlab.config import ConfigError, TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.evaluate import evaluate
from ftlab.models import load_model, load_trained, prepare_model, save_trained
from ftlab.tasks import Splits, TaskSpec
from ftlab.tasks.base import Example
from ftlab.train import RunData, train

SPEC = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])


def _flat_dev_data() -> RunData:
    """A dev set whose accuracy is 0.5 whatever the weights (each text twice, once per label),
    so no later evaluation beats step 0's and the best dev step is 0."""
    words = ["bad", "good", "great", "terrible"]
    train_ex = [Example(id=f"tr{i}", fields={"text": f"the movie was {words[i % 4]}"}, label=i % 2) for i in range(8)]
    dev = [Example(id=f"d{i}{label}", fields={"text": f"the film was {words[i]}"}, label=label)
           for i in range(2) for label in (0, 1)]
    test = [Example(id=f"te{i}", fields={"text": f"the plot was {words[i % 4]}"}, label=i % 2) for i in range(6)]
    return RunData(SPEC, Splits(train=train_ex, dev=dev, test=test))


def _cfg(out, base, *overrides):
    return load_config(TrainConfig, None, [f"output_dir={out}", f"model={base}", "mode=lora", "lora.r=2",
                                           "optimizer=adamw", "lr=5e-2", "steps=4", "batch_size=4", "eval_every=2",
                                           "checkpoint_every=2", "eval_batch_size=8", *overrides])


def _lora_tensors(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("keep", ["last", "best"])
def test_model_holds_the_final_weights_unless_keep_best(tmp_path, base, keep):
    cfg = _cfg(tmp_path / "run", base, *([f"keep={keep}"] if keep != "last" else []))
    data = _flat_dev_data()
    results = train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=data)
    assert results["best_step"] == 0 and results["best_dev"] == 0.5  # the dev facts, whatever is kept
    assert results["model"] == keep and results["model_step"] == (4 if keep == "last" else 0)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    saved, tokenizer = load_trained(str(base), tmp_path / "run" / "model")
    got = _lora_tensors(saved)
    final = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert got.keys() == final.keys() == best.keys() and got
    assert any(not torch.equal(final[n], best[n]) for n in final)  # training moved the adapters
    want = final if keep == "last" else best
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    lora_b = [t for n, t in got.items() if "lora_B" in n]
    assert all(t.abs().sum() == 0 for t in lora_b) == (keep == "best")  # step 0: every lora_B zero
    # The test metrics are those of the weights saved.
    test = evaluate(saved, tokenizer, SPEC, data.splits.test, batch_size=8, max_length=cfg.data.max_length,
                    progress=False)
    assert test.metrics == results["test"]


class _Killed(Exception):
    pass


def _kill_after(cfg, base, last_step):
    """Train ``cfg`` and kill it after step ``last_step`` (its callback raises)."""
    def kill(step, record):
        if step == last_step:
            raise _Killed

    with pytest.raises(_Killed):
        train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=_flat_dev_data(), callback=kill)


def test_a_resumed_run_keeps_the_same_weights(tmp_path, base):
    """A run killed after its last checkpoint (before results.json) finishes to the same model/."""
    straight = train(_cfg(tmp_path / "a", base), progress=False, model_and_tokenizer=load_model(str(base)),
                     data=_flat_dev_data())

    cfg = _cfg(tmp_path / "b", base)
    _kill_after(cfg, base, 4)
    resumed = train(cfg, progress=False, model_and_tokenizer=load_model(str(base)), data=_flat_dev_data())
    assert resumed == straight and resumed["model"] == "last"
    a, b = (load_file(str(tmp_path / r / "model" / "adapter_model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train(cfg, progress=False) == straight  # finished: just its results


def test_keep_may_change_on_resuming_a_run_written_before_it_existed(tmp_path, base):
    """A killed run whose config.json has no keep (ftlab before it) resumes with keep=best; a
    finished one is not refused for another keep either (its results say what model/ holds)."""
    cfg = _cfg(tmp_path / "run", base)
    _kill_after(cfg, base, 3)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["keep"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    best = _cfg(tmp_path / "run", base, "keep=best")
    results = train(best, progress=False, model_and_tokenizer=load_model(str(base)), data=_flat_dev_data())
    assert results["model"] == "best" and results["model_step"] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["keep"] == "best"
    assert train(cfg, progress=False) == results  # finished: keep=last does not redo it
    with pytest.raises(FtlabError, match="holds a run written with other settings"):  # other settings still refuse
        train(_cfg(tmp_path / "run", base, "lr=0.5"), progress=False)


def test_a_seed_study_started_before_keep_kept_the_best(tmp_path):
    from ftlab.config import to_dict
    from ftlab.seeds.runner import SeedStudyConfig, _stored_study

    for eval_every, want in ((10, "best"), (0, "last")):
        stored = to_dict(SeedStudyConfig(train=TrainConfig(eval_every=eval_every)))
        del stored["train"]["keep"]
        (tmp_path / "study.json").write_text(json.dumps(stored))
        assert _stored_study(tmp_path / "study.json").train.keep == want


def test_keep_best_needs_dev_evaluations():
    with pytest.raises(ConfigError, match=r"keep: 'best' keeps the weights of the best dev evaluation: set "
                                          r"eval_every > 0 and data.n_dev > 0 \(got 0 and 500\)"):
        load_config(TrainConfig, None, ["keep=best", "eval_every=0"])
    assert load_config(TrainConfig, None, []).keep == "last"


# -- portable adapters ---------------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path, monkeypatch, tiny_model_factory, tiny_tokenizer):
    """A tiny llama posing as the embedded model smollm2-135m: its 'converted' folder in a
    private ftlab cache, as load_model finds it (a machine-local path)."""
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    tiny_model_factory("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "ftlab_source.json").write_text('{"model": "smollm2-135m"}')
    return folder


def _trained(mode):
    """smollm2-135m (the tiny stand-in) with trained-looking (non-zero) adapters or prefix."""
    model, tokenizer = load_model("smollm2-135m")
    module = prepare_model(model, mode, lora=None, seed=0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return module.eval(), tokenizer


def _logits(module, tokenizer):
    ids = tokenizer(["the movie was great", "it was bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return module(**ids).logits


def test_a_saved_lora_model_loads_with_plain_transformers_and_peft_elsewhere(tmp_path, embedded):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, tokenizer = _trained("lora")
    save_trained(module, tokenizer, tmp_path / "run" / "model")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "run" / "model", copy)
    shutil.rmtree(tmp_path / "run")
    config = json.loads((copy / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m"
    assert str(tmp_path) not in (copy / "adapter_config.json").read_text()  # no machine-local path
    base_file = json.loads((copy / "ftlab_base.json").read_text())
    assert base_file["name"] == "smollm2-135m" and base_file["dtype"] == "float32"
    assert len(base_file["sha256"]) == 64
    plain_tokenizer = AutoTokenizer.from_pretrained(copy)
    assert plain_tokenizer("the movie was great")["input_ids"] == tokenizer("the movie was great")["input_ids"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded), copy).eval()
    plain_tokenizer.pad_token = plain_tokenizer.pad_token or plain_tokenizer.eos_token
    torch.testing.assert_close(_logits(plain, plain_tokenizer), _logits(module, tokenizer), rtol=0, atol=0)
    loaded, _ = load_trained("smollm2-135m", copy)
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(module, tokenizer), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_load_trained_refuses_another_base(tmp_path, embedded, tiny_model_factory, tiny_tokenizer, mode):
    module, tokenizer = _trained(mode)
    save_trained(module, tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer_config.json").is_file()
    other = tiny_model_factory("llama")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # same shapes, other weights
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(FtlabError, match=r"model was trained on base 'smollm2-135m' \(weights sha256 [0-9a-f]{12}"
                                         r"\.\.\.\), but '.*other' has weights sha256 [0-9a-f]{12}\.\.\.: pass the "
                                         "base it was trained on"):
        load_trained(str(tmp_path / "other"), tmp_path / "model")
    same = tmp_path / "same"  # the same weights in another folder pass
    shutil.copytree(embedded, same)
    loaded, _ = load_trained(str(same), tmp_path / "model")
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(module, tokenizer), rtol=0, atol=0)


def test_save_trained_without_a_tokenizer_saves_none(tmp_path, embedded):
    module, _ = _trained("lora")
    save_trained(module, None, tmp_path / "model")
    assert not (tmp_path / "model" / "tokenizer_config.json").exists()
    assert (tmp_path / "model" / "ftlab_base.json").is_file()


def test_eval_of_a_trained_adapter_uses_the_base_it_records(tmp_path, embedded):
    """`ftlab eval --trained DIR` without --model takes the base DIR's ftlab_base.json names
    (recorded_base), so an adapter is evaluated on its own base, not on the default model."""
    from typer.testing import CliRunner

    from ftlab.cli import app
    from ftlab.models import recorded_base

    base = tmp_path / "my-base"
    shutil.copytree(embedded, base)
    model, tokenizer = load_model(str(base))
    module = prepare_model(model, "lora", lora=None, seed=0)
    save_trained(module, tokenizer, tmp_path / "model")
    assert recorded_base(tmp_path / "model") == str(base)
    shutil.rmtree(embedded)  # the default model is gone: only the recorded base can serve
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t {i}", "label": i % 2}) + "\n" for i in range(4)))
    args = ["eval", "--task", str(data), "--template", "{text} was", "--options", " bad, good",
            "--trained", str(tmp_path / "model"), "--n-test", "4", "--n-train", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    result = CliRunner().invoke(app, [*args, "--model", "smollm2-135m"])  # the user's choice wins
    assert result.exit_code != 0
