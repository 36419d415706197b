"""Run files never trusted without a checksum: checkpoint manifests, the tensors' sha256 in
best.safetensors, results.json's own sha256, a trajectory log bound to its config, finite
settings and seeds in range, and no model saved from non-finite weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftlab.checkpoint import (
    SHA256_KEY,
    TrainState,
    config_id,
    load_trainable,
    run_id,
    save_trainable,
    tensors_sha256,
    verify_checkpoint,
)
from ftlab.config import ConfigError, TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.io import MANIFEST, json_sha256, verify_manifest, write_manifest
from ftlab.rundir import RunDir
from ftlab.train import train

from run_fixtures import tiny_run_cfg, tiny_run_data

# -- manifests ------------------------------------------------------------------------------------

def _folder(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(bytes(range(200)))
    (folder / "sub" / "b.json").write_text('{"x": 1}')
    write_manifest(folder, note="kept")
    return folder


def test_a_manifest_lists_every_file_and_passes_an_untouched_folder(tmp_path):
    folder = _folder(tmp_path)
    manifest = verify_manifest(folder, "fix it")
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"] and manifest["note"] == "kept"
    assert manifest["files"]["a.bin"]["size"] == 200


@pytest.mark.parametrize("fault,words", [
    (lambda f: f.joinpath("a.bin").write_bytes(bytes([1]) + bytes(range(1, 200))), "sha256 differs"),
    (lambda f: f.joinpath("a.bin").write_bytes(bytes(range(100))), "100 bytes, 200 were written"),
    (lambda f: f.joinpath("sub", "b.json").unlink(), "is missing"),
    (lambda f: f.joinpath("extra.pt").write_bytes(b"x"), "was not written with the rest"),
    (lambda f: f.joinpath(MANIFEST).write_text("{"), "is damaged (JSONDecodeError"),
])
def test_a_manifest_refuses_each_fault_in_one_line_naming_the_file(tmp_path, fault, words):
    folder = _folder(tmp_path)
    fault(folder)
    with pytest.raises(FtlabError) as e:
        verify_manifest(folder, "fix it")
    assert words in str(e.value) and str(e.value).endswith("fix it") and len(str(e.value).splitlines()) == 1


def test_a_folder_without_a_manifest_is_taken_as_written_before_manifests(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    assert verify_manifest(tmp_path, "fix it") is None
    verify_checkpoint(tmp_path)  # no error


def test_files_added_to_a_model_folder_are_ignored_when_not_exact(tmp_path):
    folder = _folder(tmp_path)
    (folder / "README.md").write_text("notes")
    with pytest.raises(FtlabError):
        verify_manifest(folder, "fix it")
    assert verify_manifest(folder, "fix it", exact=False) is not None


# -- one AdamW checkpoint --------------------------------------------------------------------------

def _killed_run(tmp_path, tiny_model_factory, tiny_tokenizer, *overrides):
    cfg = tiny_run_cfg(tmp_path / "run", *overrides, steps=4, eval_every=2, checkpoint_every=2)

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=tiny_run_data(), callback=kill)
    return cfg


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_a_flipped_bit_in_a_checkpoint_file_stops_the_resume(tmp_path, tiny_model_factory, tiny_tokenizer, name):
    cfg = _killed_run(tmp_path, tiny_model_factory, tiny_tokenizer)
    target = tmp_path / "run" / "checkpoint" / name
    data = bytearray(target.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # inside the tensors or pickled state: still a loadable file
    target.write_bytes(bytes(data))
    with pytest.raises(FtlabError) as e:
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=tiny_run_data())
    message = str(e.value)
    assert message.startswith(f"{target} is damaged (its sha256 differs") and len(message.splitlines()) == 1
    assert f"delete {tmp_path / 'run' / 'checkpoint'} to restart the run from step 0" in message


def test_an_edited_step_in_state_json_stops_the_resume(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg = _killed_run(tmp_path, tiny_model_factory, tiny_tokenizer)
    target = tmp_path / "run" / "checkpoint" / "state.json"
    target.write_text(target.read_text().replace('"step": 2', '"step": 1'))
    with pytest.raises(FtlabError, match=r"state\.json is damaged \(it has \d+ bytes|state\.json is damaged \(its sha"):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=tiny_run_data())


def test_a_checkpoint_records_its_config_data_and_metrics(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg = _killed_run(tmp_path, tiny_model_factory, tiny_tokenizer)
    state = TrainState.from_json(json.loads((tmp_path / "run/checkpoint/state.json").read_text()), tmp_path)
    assert state.config == config_id(json.loads((tmp_path / "run/config.json").read_text())) == run_id(cfg)
    assert set(state.data) == {"spec", "train", "dev", "test"} and state.metrics is not None


def test_resuming_on_other_data_is_refused(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg = _killed_run(tmp_path, tiny_model_factory, tiny_tokenizer)
    data = tiny_run_data()
    data.splits.train[0] = type(data.splits.train[0])(id="s:0", fields={"text": "edited"}, label=0)
    with pytest.raises(FtlabError, match=r"data\.task='sentiment': the train examples differ from those the "
                                         r"checkpoint .* \(step 2\) was trained on"):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=data)


# -- best.safetensors and results.json ----------------------------------------------------------

def test_save_trainable_records_the_tensors_sha256_and_load_trainable_checks_it(tmp_path, tiny_model):
    tiny_model.lm_head.weight.requires_grad_(False)
    path = tmp_path / "best.safetensors"
    save_trainable(tiny_model, path)
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata={SHA256_KEY: tensors_sha256(load_file(str(path)))})  # the old hash
    with pytest.raises(FtlabError, match=r"best\.safetensors is damaged \(its tensors' sha256 differs"):
        load_trainable(tiny_model, path)
    save_file(tensors, str(path))  # written before ftlab recorded a hash: taken as it is
    load_trainable(tiny_model, path)
    assert torch.equal(dict(tiny_model.named_parameters())[name].detach(), tensors[name])


def test_an_edited_results_file_is_refused_when_read_back(tmp_path, tiny_model_factory, tiny_tokenizer):
    cfg = tiny_run_cfg(tmp_path / "run", "mode=lora", steps=1)
    results = train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
                    data=tiny_run_data())
    run = RunDir(tmp_path / "run")
    assert json.loads((run.model / MANIFEST).read_text())["results_sha256"] == json_sha256(results)
    assert run.read_results() == results
    run.results.write_text(json.dumps({**results, "best_step": 7}))
    with pytest.raises(FtlabError, match=r"results\.json is damaged \(its sha256 differs .* delete it to evaluate"):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=tiny_run_data())


# -- settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["lr=.inf", "lr=nan", "lr=-.inf", "zo.eps=inf", "adam_eps=.nan",
                                      "weight_decay=inf", "max_grad_norm=.inf", "local_sgd.alpha=.inf",
                                      "adam_betas=[.nan, 0.9]", "lr=1e999", "lr=1e300", "zo.eps=-1e39"])
def test_non_finite_float_settings_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number") as e:
        load_config(TrainConfig, None, [override])
    assert e.value.field.split("[")[0].endswith(override.split("=")[0].split(".")[-1])


@pytest.mark.parametrize("override", ["seed=9223372036854775808", "seed=-1", "order_seed=4294967296",
                                      "init_seed=18446744073709551616", "zo_seed=-5", "data.data_seed=4294967296"])
def test_seeds_out_of_range_are_refused_in_one_line(override):
    with pytest.raises(ConfigError, match=r"must be a seed in \[0, 2\^32\)") as e:
        load_config(TrainConfig, None, [override])
    assert len(str(e.value).splitlines()) == 1
    load_config(TrainConfig, None, [override.split("=")[0] + "=4294967295"])  # the largest seed passes


def test_seed_lists_of_other_configs_are_checked_too():
    from ftlab.probe.experiment import ProbeConfig

    with pytest.raises(ConfigError, match=r"seeds: must be a seed in \[0, 2\^32\) \(got 18446744073709551616\)"):
        load_config(ProbeConfig, None, ["seeds=[0, 18446744073709551616]"])


def test_a_weight_decay_that_flips_the_weights_sign_is_refused():
    with pytest.raises(ConfigError, match=r"config\.weight_decay: lr \* weight_decay must be < 1"):
        load_config(TrainConfig, None, ["lr=1e38", "weight_decay=1e38"])


def test_a_run_whose_weights_are_not_finite_saves_no_model(tmp_path, tiny_model_factory, tiny_tokenizer):
    # Every loss is NaN: MeZO skips both steps (max_skipped_steps=10) and the run reaches its end
    model = tiny_model_factory("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    cfg = tiny_run_cfg(tmp_path / "run", "optimizer=mezo", "mode=full", steps=2)
    with pytest.raises(FtlabError, match=r"the trained weights hold NaN or inf \(.*down_proj.weight, 1 values\)"):
        train(cfg, progress=False, model_and_tokenizer=(model, tiny_tokenizer), data=tiny_run_data())
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "results.json").exists()
