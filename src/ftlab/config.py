"""Typed, serialisable run configs, loaded from YAML with ``key.sub=value`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ftlab.errors import FtlabError
from ftlab.models import LoraSettings, PrefixSettings
from ftlab.zo.settings import ZOSettings

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which task, how it is phrased, and how it is split (the MeZO protocol by default:
    1000 train / 500 dev / 1000 test; ``k_per_class`` gives balanced k-shot train and dev)."""

    task: str = "sentiment"
    template: str | None = None
    options: list[str] | None = None
    n_train: int = 1000
    n_dev: int = 500
    n_test: int = 1000
    k_per_class: int | None = None
    data_seed: int = 0
    max_length: int = 256


@dataclass
class TrainConfig:
    """One fine-tuning run. ``mode`` picks what is trained; ``optimizer`` how."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    mode: str = "full"  # full | lora | prefix
    lora: LoraSettings = field(default_factory=LoraSettings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    optimizer: str = "adamw"  # adamw | sgd | mezo | zo-momentum | zo-adam | zo-sign | sparse-mezo
    zo: ZOSettings = field(default_factory=ZOSettings)
    # What the optimizer minimises: "loss" (differentiable), or minus the batch's "accuracy"
    # (classification) or "f1" (generation, greedy decoding): zeroth-order optimizers only.
    objective: str = "loss"
    lr: float = 1e-5
    weight_decay: float = 0.0
    momentum: float = 0.0
    # AdamW's betas and eps (None: torch's defaults (0.9, 0.999) and 1e-8); the batch-size
    # scaling rules of ftlab.scaling change them.
    adam_betas: list[float] | None = None
    adam_eps: float | None = None
    max_grad_norm: float | None = 1.0
    # Zeroth-order steps with a NaN/inf loss are skipped (and logged); the run stops after this many.
    max_skipped_steps: int = 10
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    steps: int = 200
    batch_size: int = 8
    eval_every: int = 50
    eval_batch_size: int = 32
    checkpoint_every: int = 50
    seed: int = 0
    # Separate seeds per source of randomness, for seed studies (None: ``seed``); ``seed`` alone
    # draws the train/dev split. order: batch order and dropout; init: new parameters (LoRA,
    # prefix); zo: the zeroth-order optimizer's perturbations.
    order_seed: int | None = None
    init_seed: int | None = None
    zo_seed: int | None = None
    output_dir: str = "runs/default"

    def seed_of(self, kind: str) -> int:
        """The seed of one source of randomness (``"order"``, ``"init"`` or ``"zo"``)."""
        value = getattr(self, f"{kind}_seed")
        return self.seed if value is None else value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses; unknown keys
    are errors (a typo must not silently fall back to a default)."""
    if not isinstance(data, dict):
        raise FtlabError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FtlabError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{key}")
        kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept ints and numeric strings for floats (YAML reads ``1e-4`` as a string) and check
    scalar types, so a bad override fails loudly."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if typ in (int, str, bool) and type(value) is typ:
            return value
        origin = typing.get_origin(typ)
        if origin is list and isinstance(value, list):
            return value
        if dataclasses.is_dataclass(typ) and isinstance(value, typ):
            return value
    raise FtlabError(f"{where}: {value!r} is not a valid {hint}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FtlabError(f"override {item!r}: write it as key=value, e.g. lr=1e-4 or lora.r=16")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise FtlabError(f"override {item!r}: the value is not valid YAML; quote it, e.g. "
                             f"{key}='{raw}'") from None
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults <- YAML file <- overrides, validated into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FtlabError(f"config file {path} not found (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FtlabError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    return from_dict(cls, apply_overrides(data, list(overrides)), where=str(path or "config"))


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass."""
    return dataclasses.asdict(config)
