import dataclasses
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from ftlab.config import (
    CHUNK,
    ConfigError,
    DataConfig,
    LocalSGDSettings,
    LoraSettings,
    PrefixSettings,
    Settings,
    TrainConfig,
    ZOSettings,
    at_least,
    check,
    from_dict,
    in_unit_interval,
    load_config,
    non_empty,
    not_blank,
    rule_of,
    setting,
    to_dict,
)
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


def test_importing_the_config_loads_neither_torch_nor_numpy():
    code = ("import sys, ftlab.config; heavy = [m for m in ('torch', 'numpy', 'transformers', 'ftlab.zo', "
            "'ftlab.models', 'ftlab.distributed') if m in sys.modules]; assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@dataclass
class _Toy(Settings):
    """A config of the pattern: per-field rules, a rule between fields, nested sections."""

    where = "toy"

    name: str = setting("a", check=not_blank, need="a name")
    size: int = setting(1, check=at_least(1))
    rate: float = setting(0.5, check=in_unit_interval, need="in [0, 1) for {name}")
    low: int = 0
    high: int = 1
    data: DataConfig = field(default_factory=DataConfig)

    def check_combinations(self) -> None:
        if self.low >= self.high:
            raise ConfigError("high", f"must be above low={self.low} (got {self.high})")


def test_rules_declared_with_the_fields_are_checked_when_a_config_is_built():
    assert _Toy().size == 1 and _Toy(size=3, low=2, high=5).high == 5
    for kwargs, message in [
        ({"size": 0}, "toy.size: must be >= 1 (got 0)"),
        ({"size": "3"}, "toy.size: '3' is not a valid int (expected an integer)"),
        ({"rate": 1.0, "name": "b"}, "toy.rate: must be in [0, 1) for b (got 1.0)"),  # need names a field
        ({"name": " "}, "toy.name: must be a name (got ' ')"),
        ({"low": 3, "high": 3}, "toy.high: must be above low=3 (got 3)"),  # the rule between fields, last
        ({"size": 0, "low": 3}, "toy.size: must be >= 1 (got 0)"),  # field rules first
    ]:
        with pytest.raises(ConfigError) as e:
            _Toy(**kwargs)
        assert str(e.value) == message
    with pytest.raises(ConfigError, match=r"^data.n_train: must be >= 0 \(got -1\)$"):
        _Toy(data=DataConfig(n_train=-1))  # a section checks itself, under its own name
    toy = _Toy()
    with pytest.raises(ConfigError, match=r"^toy.size: must be >= 1"):
        dataclasses.replace(toy, size=0)  # replace builds a new object: checked too
    toy.data.n_train = -1  # changed in place: check() / validate() find it, under any name
    with pytest.raises(ConfigError, match=r"^toy.data.n_train: must be >= 0"):
        toy.validate()
    with pytest.raises(ConfigError, match=r"^my run.data.n_train: must be >= 0"):
        check(toy, "my run")


def test_from_dict_names_faults_after_its_source():
    for data, where, message in [
        ({"size": 0}, None, "toy.size: must be >= 1 (got 0)"),
        ({"size": 0}, "toy.yaml", "toy.yaml.size: must be >= 1 (got 0)"),
        ({"low": 5}, "toy.yaml", "toy.yaml.high: must be above low=5 (got 1)"),
        ({"data": {"n_dev": -2}}, "toy.yaml", "toy.yaml.data.n_dev: must be >= 0 (got -2)"),
        ({"data": {"options": [" a", 2]}}, "toy.yaml", "toy.yaml.data.options[1]: 2 is not a valid str"),
        ({"data": {"nope": 1}}, "toy.yaml", "toy.yaml.data: unknown key(s) ['nope']"),
        ([1], "toy.yaml", "toy.yaml: expected a mapping, got [1]"),
    ]:
        with pytest.raises(ConfigError) as e:
            from_dict(_Toy, data, where)
        assert str(e.value).startswith(message), str(e.value)
    assert from_dict(_Toy, {"rate": "0.25", "data": {"task": "trec"}}, "toy.yaml") == _Toy(rate=0.25,
                                                                                         data=DataConfig(task="trec"))


def test_sections_built_in_code_name_their_section():
    for build, message in [
        (lambda: LoraSettings(r=0), "lora.r: must be >= 1 (got 0)"),
        (lambda: LoraSettings(target_modules=[]), "lora.target_modules: must be a non-empty list of module names"),
        (lambda: PrefixSettings(init="zeros"), "prefix.init: 'zeros' is not one of 'real_activations', 'random'"),
        (lambda: ZOSettings(eps=0.0), "zo.eps: must be > 0 (got 0.0)"),
        (lambda: ZOSettings(betas=[0.9]), "zo.betas: must be two numbers in [0, 1)"),
        (lambda: LocalSGDSettings(period=2, rule="quadratic"), "local_sgd.alpha: must be set (> 0) for rule=quadratic"),
        (lambda: TrainConfig(fsdp=True, offload=True), "config: fsdp and offload cannot be combined"),
    ]:
        with pytest.raises(ConfigError) as e:
            build()
        assert str(e.value).startswith(message), str(e.value)
    assert ZOSettings().chunk_size == CHUNK and LocalSGDSettings(period=2, rule="quadratic", alpha=0.1).alpha == 0.1


def test_config_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(ConfigError("lr", "must be > 0 (got 0)", "config")))
    assert isinstance(error, FtlabError) and str(error) == "config.lr: must be > 0 (got 0)" and error.field == "lr"


def test_a_rule_says_what_it_needs():
    with pytest.raises(TypeError, match="needs need="):
        setting(1, check=non_empty)
    assert rule_of(dataclasses.fields(TrainConfig)[0])[1] == "a model name or folder"
    assert rule_of(next(f for f in dataclasses.fields(TrainConfig) if f.name == "seed")) is None


def test_config_json_keeps_its_keys_and_order():
    """config.json is to_dict(TrainConfig): the fields in order, sections as dicts, nothing else
    (old run folders must resume)."""
    d = to_dict(load_config(TrainConfig, None, ["mode=lora", "lr=1e-4"]))
    assert list(d) == [f.name for f in dataclasses.fields(TrainConfig)]
    # The keys of earlier versions first, in their order; new estimators' knobs after them (an old
    # config.json lacks those, and a key an old config lacks is read as its default).
    assert list(d["zo"]) == ["eps", "n_perturbations", "one_sided", "distribution", "generator", "chunk_size",
                             "exact", "momentum", "betas", "sparsity", "batched", "hessian_smoothing", "rank",
                             "refresh_every", "pool_size", "elite_fraction", "svrg_every", "svrg_batch",
                             "svrg_full_lr_scale"]
    assert list(d["lora"]) == ["r", "alpha", "dropout", "target_modules"]
    assert d["lr"] == 1e-4 and d["lora"]["r"] == 8 and "where" not in d


def test_every_checks_each_item_of_a_non_empty_list():
    from ftlab.config import above, every

    positive = every(above(0))
    assert positive([1, 2.5]) and not positive([]) and not positive([1, -1])
    assert positive.need == "a non-empty list of values > 0"
