"""Configs are checked completely (types, ranges, choices) before anything is written or loaded,
each fault in one line naming the field; overrides are parsed by the type of their field."""

import subprocess
import sys
import typing

import pytest

from ftlab.config import DataConfig, TrainConfig, ZOSettings, from_dict, load_config, to_dict
from ftlab.errors import FtlabError


@pytest.mark.parametrize("override,message", [
    ("lr=-0.1", "config.lr: must be > 0 for optimizer adamw (got -0.1)"),
    ("lr=0", "config.lr: must be > 0 for optimizer adamw (got 0.0)"),
    ("steps=0", "config.steps: must be >= 1 (got 0)"),
    ("steps=-3", "config.steps: must be >= 1 (got -3)"),
    ("batch_size=0", "config.batch_size: must be >= 1 (got 0)"),
    ("eval_every=-1", "config.eval_every: must be >= 0"),
    ("eval_batch_size=0", "config.eval_batch_size: must be >= 1"),
    ("checkpoint_every=-5", "config.checkpoint_every: must be >= 0"),
    ("warmup_steps=-1", "config.warmup_steps: must be >= 0"),
    ("weight_decay=-1", "config.weight_decay: must be >= 0"),
    ("momentum=1.5", "config.momentum: must be in [0, 1)"),
    ("adam_betas=[0.9]", "config.adam_betas: must be two numbers in [0, 1)"),
    ("adam_eps=0", "config.adam_eps: must be > 0"),
    ("mode=ful", "config.mode: 'ful' is not one of 'full', 'lora', 'prefix'"),
    ("optimizer=adam", "config.optimizer: 'adam' is not one of 'adamw', 'sgd', 'mezo'"),
    ("schedule=exp", "config.schedule: 'exp' is not one of 'constant', 'linear', 'cosine'"),
    ("dtype=float64", "config.dtype: 'float64' is not one of"),
    ("objective=bleu", "config.objective: 'bleu' is not one of 'loss', 'accuracy', 'f1'"),
    ("objective=accuracy", "config.objective: 'accuracy' has no gradient"),
    ("zo.distribution=uniform", "config.zo.distribution: 'uniform' is not one of 'gaussian', 'rademacher'"),
    ("zo.generator=numpy", "config.zo.generator: 'numpy' is not one of"),
    ("zo.eps=0", "config.zo.eps: must be > 0"),
    ("zo.n_perturbations=0", "config.zo.n_perturbations: must be >= 1"),
    ("zo.chunk_size=0", "config.zo.chunk_size: must be >= 1"),
    ("zo.sparsity=1", "config.zo.sparsity: must be in [0, 1)"),
    ("lora.r=0", "config.lora.r: must be >= 1"),
    ("lora.dropout=1", "config.lora.dropout: must be in [0, 1)"),
    ("prefix.num_tokens=0", "config.prefix.num_tokens: must be >= 1"),
    ("prefix.init=zeros", "config.prefix.init: 'zeros' is not one of 'real_activations', 'random'"),
    ("data.options=[1,2]", "config.data.options[0]: 1 is not a valid str"),
    ("data.options=[' great']", "config.data.options: must be two or more distinct"),
    ("data.options=[' a', ' a']", "config.data.options: must be two or more distinct"),
    ("data.n_train=-1", "config.data.n_train: must be >= 0"),
    ("data.k_per_class=0", "config.data.k_per_class: must be >= 1"),
    ("data.max_length=1", "config.data.max_length: must be >= 2"),
    ("data.task.x=1", "override 'data.task.x=1': data.task is text, not a section with keys"),
    ("lr.x=1", "override 'lr.x=1': lr is a number, not a section with keys"),
    ("steps=true", "config.steps: True is not a valid int"),
    ("output_dir=' '", "config.output_dir: must be a folder path"),  # (output_dir= is null: named from the config)
])
def test_bad_values_are_one_line_naming_the_field(override, message):
    with pytest.raises(FtlabError) as e:
        load_config(TrainConfig, None, [override])
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_text_fields_take_the_override_as_written():
    # The README's own-data example.
    cfg = load_config(TrainConfig, None, ["data.task=reviews.jsonl", "data.template={review} It was",
                                          "data.options=[' terrible', ' great']"])
    assert cfg.data.task == "reviews.jsonl" and cfg.data.template == "{review} It was"
    assert cfg.data.options == [" terrible", " great"]
    cfg = load_config(TrainConfig, None, ["data.template=Q: {q} A: [yes/no]? #1", "model=./my: model",
                                          "output_dir=runs/a=b", "device=cuda:1"])
    assert cfg.data.template == "Q: {q} A: [yes/no]? #1" and cfg.model == "./my: model"
    assert cfg.output_dir == "runs/a=b" and cfg.device == "cuda:1"
    # A value wholly in quotes is unquoted (as YAML does: the form the old parser asked for).
    assert load_config(TrainConfig, None, ["data.template='{text} It was'"]).data.template == "{text} It was"
    assert load_config(TrainConfig, None, ["data.template=null"]).data.template is None
    # Non-text fields are still YAML.
    cfg = load_config(TrainConfig, None, ["lr=1e-4", "adam_betas=[0.9, 0.95]", "zo.exact=true"])
    assert cfg.lr == 1e-4 and cfg.adam_betas == [0.9, 0.95] and cfg.zo.exact is True


def test_optimizer_choices_match_the_implemented_optimizers():
    from ftlab.config import Optimizer
    from ftlab.zo import ZO_OPTIMIZERS

    assert set(typing.get_args(Optimizer)) == {"adamw", "sgd", *ZO_OPTIMIZERS}


def test_generator_choices_match_the_implemented_generators():
    from ftlab.zo.directions import GENERATORS

    hints = typing.get_type_hints(ZOSettings)
    assert set(typing.get_args(hints["generator"])) == set(GENERATORS)


@pytest.mark.parametrize("build,message", [
    (lambda out: TrainConfig(steps=0, output_dir=out), "config.steps: must be >= 1 (got 0)"),
    (lambda out: TrainConfig(lr=-1.0, output_dir=out), "config.lr: must be > 0 for optimizer adamw (got -1.0)"),
    (lambda out: TrainConfig(data=DataConfig(options=[1, 2]), output_dir=out),  # type: ignore[list-item]
     "data.options[0]: 1 is not a valid str (expected text)"),
    (lambda out: TrainConfig(mode="LoRA", output_dir=out),  # type: ignore[arg-type]
     "config.mode: 'LoRA' is not one of 'full', 'lora', 'prefix'"),
    (lambda out: TrainConfig(optimizer="mezo", autocast=True, output_dir=out), "config.autocast: bf16 autocast"),
])
def test_configs_built_in_code_are_checked_when_built(build, message):
    with pytest.raises(FtlabError) as e:
        build("runs/x")
    assert str(e.value).startswith(message) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_configs_changed_in_place_are_checked_before_training(tmp_path):
    from ftlab.train import train

    out = tmp_path / "run"
    for field, value in [("steps", 0), ("lr", -1.0), ("mode", "LoRA")]:
        cfg = TrainConfig(output_dir=str(out))
        setattr(cfg, field, value)
        with pytest.raises(FtlabError, match=f"config.{field}: "):
            train(cfg, progress=False)
        assert not out.exists()  # nothing written, no model loaded
    cfg = TrainConfig(output_dir=str(out))
    cfg.data.options = [1, 2]  # type: ignore[list-item]
    with pytest.raises(FtlabError, match=r"config.data.options\[0\]: 1 is not a valid str"):
        train(cfg, progress=False)
    assert not out.exists()
    assert from_dict(TrainConfig, to_dict(TrainConfig())) == TrainConfig()


def test_cli_refuses_bad_steps_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "ftlab.cli", "train", f"output_dir={out}", "steps=0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: config.steps: must be >= 1 (got 0)"], result.stderr
    assert not out.exists()


def test_yaml_files_are_checked_and_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: -1\n")
    with pytest.raises(FtlabError, match=r"c\.yaml\.lr: must be > 0"):
        load_config(TrainConfig, path)
    path.write_text("- a\n- b\n")
    with pytest.raises(FtlabError, match="expected a mapping"):
        load_config(TrainConfig, path)
