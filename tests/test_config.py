import pytest

from ftlab.config import DataConfig, TrainConfig, load_config, to_dict
from ftlab.errors import FtlabError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: lora\nlr: 0.001\ndata:\n  task: trec\n  n_train: 64\nlora:\n  r: 4\n")
    cfg = load_config(TrainConfig, path, ["lr=1e-4", "lora.r=16", "data.options=[' a', ' b']", "steps=7"])
    assert cfg.mode == "lora" and cfg.lr == 1e-4 and cfg.steps == 7
    assert cfg.lora.r == 16 and cfg.data.task == "trec" and cfg.data.n_train == 64
    assert cfg.data.options == [" a", " b"]
    assert isinstance(cfg.data, DataConfig)


def test_round_trip():
    cfg = load_config(TrainConfig, None, ["prefix.num_tokens=3", "data.k_per_class=16"])
    from ftlab.config import from_dict
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,match", [
    ("lrr=1", "unknown key"), ("data.tsk=x", "unknown key"), ("steps=ten", "not a valid"),
    ("lr", "key=value"), ("lora.r=1.5", "not a valid"),
    # Text fields take the text as written (test_config_validation); other fields are YAML.
    ("lora.target_modules=[q_proj, v_proj", "not valid YAML")])
def test_bad_overrides_are_named(override, match):
    with pytest.raises(FtlabError, match=match):
        load_config(TrainConfig, None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FtlabError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(FtlabError, match="invalid YAML"):
        load_config(TrainConfig, bad)
