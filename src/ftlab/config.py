"""Typed, serialisable run configs, loaded from YAML with ``key.sub=value`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ftlab.errors import FtlabError
from ftlab.models import LoraSettings, PrefixSettings
from ftlab.zo.settings import ZOSettings

T = TypeVar("T")

Dtype = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
Optimizer = Literal["adamw", "sgd", "mezo", "zo-momentum", "zo-adam", "zo-sign", "sparse-mezo"]


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
class LocalSGDSettings:
    """Local SGD for first-order data parallelism (see :mod:`ftlab.local_sgd`): ``period`` is H,
    the local steps between weight averages (H_base for the quadratic rule; null: synchronous
    DDP), ``rule`` constant or quadratic (QSR: H = max(H_base, floor((alpha / lr) ** 2)) at the
    start of each round), and ``switch_step``: synchronous steps before Local SGD starts (post-local SGD)."""

    period: int | None = None
    rule: Literal["constant", "quadratic"] = "constant"
    alpha: float | None = None
    switch_step: int = 0


@dataclass
class TrainConfig:
    """One fine-tuning run. ``mode`` picks what is trained; ``optimizer`` how."""

    model: str = "smollm2-135m"
    dtype: Dtype = "float32"
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    mode: Literal["full", "lora", "prefix"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    optimizer: Optimizer = "adamw"
    zo: ZOSettings = field(default_factory=ZOSettings)
    # What the optimizer minimises: "loss" (differentiable), or minus the batch's "accuracy"
    # (classification) or "f1" (generation, greedy decoding): zeroth-order optimizers only.
    # "quad": Saunshi et al.'s squared-loss alternative to cross-entropy (ftlab.objectives.quad).
    objective: Literal["loss", "accuracy", "f1", "quad"] = "loss"
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
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    steps: int = 200
    batch_size: int = 8  # the global batch of a step (over all processes and micro-batches)
    # Micro-batches a step's batch is evaluated in, one after the other (memory of one
    # micro-batch): first order accumulates gradients, zeroth order evaluates each perturbation
    # on all of them. batch_size must be a multiple of grad_accum x processes.
    grad_accum: int = 1
    # Models larger than one device (zeroth-order only; see README "MeZO at scale"):
    # fsdp shards every parameter over the torchrun processes (FSDP2, each rank perturbs and
    # updates its own shard); device_map places one process's model over its GPUs
    # (transformers' "auto", "balanced", ...); offload keeps the weights in CPU memory and
    # moves transformer blocks to ``device`` one at a time (ZO2).
    fsdp: bool = False
    device_map: str | None = None
    offload: bool = False
    # First-order training: Local SGD across torchrun processes (null period: synchronous DDP),
    # bf16 autocast of the forwards (float32 weights), and activation checkpointing.
    local_sgd: LocalSGDSettings = field(default_factory=LocalSGDSettings)
    autocast: bool = False
    gradient_checkpointing: bool = False
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

    def validate(self, where: str = "config") -> None:
        """Check every field (types, ranges, choices, combinations), raising a one-line
        :class:`FtlabError` that names the field; called by :func:`from_dict` and by
        ``train()`` before anything is written or loaded."""
        check(self, where)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses; unknown keys
    are errors (a typo must not silently fall back to a default), and the result is checked
    with :func:`check` (types, ranges, choices), so a bad config fails here, in one line."""
    if not isinstance(data, dict):
        raise FtlabError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise FtlabError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{key}")
        kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    obj = cls(**kwargs)
    check(obj, where)
    return obj


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return {"str": "text", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept ints and numeric strings for floats (YAML reads ``1e-4`` as a string) and check
    scalar, list-item and ``Literal`` types, so a bad override fails loudly."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in allowed:
        return None
    item_error: FtlabError | None = None
    for typ in allowed:
        if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if typ in (int, str, bool) and type(value) is typ:
            return value
        origin = typing.get_origin(typ)
        if origin is Literal and isinstance(value, (str, int, bool)) and value in typing.get_args(typ):
            return value
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(typ) or (Any,)
            if item is Any:
                return value
            try:
                return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            except FtlabError as e:
                item_error = e
                continue
        if dataclasses.is_dataclass(typ) and isinstance(value, typ):
            return value
    if item_error is not None:
        raise item_error
    choices = [a for a in allowed if a is not type(None)]
    if len(choices) == 1 and typing.get_origin(choices[0]) is Literal:
        raise FtlabError(f"{where}: {value!r} is not {_type_name(choices[0])}")
    names = " or ".join([_type_name(a) for a in choices] + (["null"] if type(None) in allowed else []))
    shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    raise FtlabError(f"{where}: {value!r} is not a valid {shown} (expected {names})")


def check(obj: Any, where: str = "config") -> None:
    """Check a config dataclass completely: every field against its type (recursing into
    nested sections), then the value rules of its class (:data:`RULES`); raises a one-line
    :class:`FtlabError` naming the field, e.g. ``config.lr: must be > 0 ... (got -0.1)``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check(value, f"{where}.{f.name}")
        else:
            _coerce(value, hints[f.name], f"{where}.{f.name}")
    for rule in RULES.get(type(obj).__name__, ()):
        rule(obj, where)


def _rule(field_name: str, ok: typing.Callable[[Any], bool], need: str, *, when: typing.Callable[[Any], bool]
          = lambda obj: True, skip_none: bool = True) -> typing.Callable[[Any, str], None]:
    """A value rule: ``ok(value)`` must hold (``need`` says what is needed, e.g. ``>= 1``)."""
    def rule(obj: Any, where: str) -> None:
        if not hasattr(obj, field_name) or not when(obj):
            return
        value = getattr(obj, field_name)
        if value is None and skip_none:
            return
        if not ok(value):
            text = need(obj) if callable(need) else need
            raise FtlabError(f"{where}.{field_name}: must be {text} (got {value!r})")
    return rule


def _ge(bound: float) -> typing.Callable[[Any], bool]:
    return lambda v: v >= bound


def _gt(bound: float) -> typing.Callable[[Any], bool]:
    return lambda v: v > bound


def _unit(v: float) -> bool:
    return 0.0 <= v < 1.0


def _pair_of_units(v: list[float]) -> bool:
    return len(v) == 2 and all(0.0 <= b < 1.0 for b in v)


def _distinct_words(v: list[str]) -> bool:
    return len(v) >= 2 and all(w.strip() for w in v) and len(set(v)) == len(v)


def _objective_needs_zo(obj: Any, where: str) -> None:
    if obj.objective not in ("loss", "quad") and obj.optimizer in ("adamw", "sgd"):
        raise FtlabError(f"{where}.objective: {obj.objective!r} has no gradient; use a zeroth-order optimizer "
                         f"(e.g. optimizer=mezo) or objective=loss (got optimizer={obj.optimizer})")


def _scale_options(obj: Any, where: str) -> None:
    """grad_accum must divide the batch; device_map / offload are zeroth-order features (fsdp
    serves both), and the three are exclusive of one another."""
    if obj.batch_size % obj.grad_accum:
        raise FtlabError(f"{where}.grad_accum: {obj.grad_accum} does not divide batch_size={obj.batch_size} "
                         f"(micro-batches must be equal); use a divisor of {obj.batch_size}")
    chosen = [name for name, on in (("fsdp", obj.fsdp), ("device_map", obj.device_map is not None),
                                    ("offload", obj.offload)) if on]
    if len(chosen) > 1:
        raise FtlabError(f"{where}: {' and '.join(chosen)} cannot be combined; choose one way to place the model")
    placed = [name for name in chosen if name != "fsdp"]  # fsdp also shards first-order training
    if placed and obj.optimizer in ("adamw", "sgd"):
        raise FtlabError(f"{where}.{placed[0]}: implemented for zeroth-order optimizers (e.g. optimizer=mezo); "
                         f"got optimizer={obj.optimizer}")


def _first_order_options(obj: Any, where: str) -> None:
    """Local SGD, autocast and activation checkpointing are first-order features."""
    zo = obj.optimizer not in ("adamw", "sgd")
    if obj.local_sgd.period is not None and zo:
        raise FtlabError(f"{where}.local_sgd: Local SGD averages first-order models; {obj.optimizer} is zeroth order "
                         f"and its data parallelism (plain torchrun) already exchanges one scalar per step: "
                         f"set local_sgd.period=null, or use optimizer=sgd or adamw")
    if obj.local_sgd.period is not None and obj.fsdp:
        raise FtlabError(f"{where}.local_sgd: Local SGD keeps a whole model per rank; it cannot be combined with fsdp")
    if obj.autocast and zo:
        raise FtlabError(f"{where}.autocast: bf16 autocast is for first-order training; for {obj.optimizer} "
                         f"use dtype=bfloat16 (exact MeZO in bf16)")
    if obj.autocast and obj.dtype not in ("float32", "fp32"):
        raise FtlabError(f"{where}.autocast: autocast runs float32 weights in bf16; use dtype=float32 "
                         f"(got dtype={obj.dtype})")
    if obj.gradient_checkpointing and obj.mode == "prefix":
        raise FtlabError(f"{where}.gradient_checkpointing: prefix tuning feeds its prefix through the layers' "
                         "key/value cache, which transformers' checkpointing drops; use mode=lora or full, or set "
                         "it to false")
    if obj.gradient_checkpointing and zo:
        raise FtlabError(f"{where}.gradient_checkpointing: saves activations for a backward pass, and "
                         f"{obj.optimizer} runs none; set gradient_checkpointing=false")


# Value rules by class name (types and choices come from the annotations). A field a class
# does not have (yet) is skipped, so the rules may name fields being added.
RULES: dict[str, list[typing.Callable[[Any, str], None]]] = {
    "TrainConfig": [
        _rule("lr", _gt(0), lambda c: f"> 0 for optimizer {c.optimizer}"),
        _rule("weight_decay", _ge(0), ">= 0"),
        _rule("momentum", _unit, "in [0, 1)"),
        _rule("adam_betas", _pair_of_units, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
        _rule("adam_eps", _gt(0), "> 0"),
        _rule("max_grad_norm", _ge(0), ">= 0 (0 or null: no clipping)"),
        _rule("max_skipped_steps", _ge(0), ">= 0"),
        _rule("warmup_steps", _ge(0), ">= 0"),
        _rule("steps", _ge(1), ">= 1"),
        _rule("batch_size", _ge(1), ">= 1"),
        _rule("grad_accum", _ge(1), ">= 1"),
        _rule("eval_every", _ge(0), ">= 0 (0: no dev evaluation)"),
        _rule("eval_batch_size", _ge(1), ">= 1"),
        _rule("checkpoint_every", _ge(0), ">= 0 (0: only at the end)"),
        _rule("model", lambda v: bool(v.strip()), "a model name or folder"),
        _rule("device", lambda v: bool(v.strip()), "a device, e.g. cpu or cuda"),
        _rule("output_dir", lambda v: bool(v.strip()), "a folder path"),
        _objective_needs_zo,
        _scale_options,
        _first_order_options,
    ],
    "DataConfig": [
        _rule("task", lambda v: bool(v.strip()), "a task name or a .jsonl/.csv file"),
        _rule("options", _distinct_words, "two or more distinct, non-blank label words, e.g. [' no', ' yes']"),
        _rule("n_train", _ge(0), ">= 0"),
        _rule("n_dev", _ge(0), ">= 0"),
        _rule("n_test", _ge(0), ">= 0"),
        _rule("k_per_class", _ge(1), ">= 1 (or null)"),
        _rule("max_length", _ge(2), ">= 2"),
    ],
    "LoraSettings": [
        _rule("r", _ge(1), ">= 1"),
        _rule("alpha", _gt(0), "> 0"),
        _rule("dropout", _unit, "in [0, 1)"),
        _rule("target_modules", lambda v: len(v) > 0, "a non-empty list of module names (or null: the default)"),
    ],
    "PrefixSettings": [_rule("num_tokens", _ge(1), ">= 1")],
    "LocalSGDSettings": [
        _rule("period", _ge(1), ">= 1 (H, the local steps between averages; null: synchronous DDP)"),
        _rule("alpha", _gt(0), "> 0"),
        _rule("alpha", lambda v: v is not None, "set (> 0) for rule=quadratic: H = max(period, floor((alpha/lr)^2))",
              when=lambda o: o.rule == "quadratic" and o.period is not None, skip_none=False),
        _rule("switch_step", _ge(0), ">= 0"),
    ],
    "ZOSettings": [
        _rule("eps", _gt(0), "> 0"),
        _rule("n_perturbations", _ge(1), ">= 1"),
        _rule("chunk_size", _ge(1), ">= 1"),
        _rule("momentum", _unit, "in [0, 1)"),
        _rule("betas", _pair_of_units, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
        _rule("sparsity", _unit, "in [0, 1)"),
    ],
}

# YAML's spellings of null: an override of a text field that may be null takes these as null.
_NULLS = ("null", "Null", "NULL", "~", "")


def _unwrap_optional(hint: Any) -> Any:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else ()
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 else hint


def _is_text(hint: Any) -> tuple[bool, bool]:
    """``(takes text, may be null)``: a ``str`` or string-``Literal`` field (optionally ``| None``)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    rest = [a for a in args if a is not type(None)]
    text = bool(rest) and all(a is str or (typing.get_origin(a) is Literal and all(
        isinstance(x, str) for x in typing.get_args(a))) for a in rest)
    return text, len(rest) != len(args)


def _parse_value(raw: str, hint: Any, item: str, key: str) -> Any:
    """An override's value: text fields take the text as it is (a value wholly in quotes is
    unquoted, as YAML would); every other field is parsed as YAML."""
    text, nullable = _is_text(hint) if hint is not None else (False, False)
    if text:
        if nullable and raw in _NULLS:
            return None
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            try:
                unquoted = yaml.safe_load(raw)
            except yaml.YAMLError:
                return raw
            return unquoted if isinstance(unquoted, str) else raw
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FtlabError(f"override {item!r}: the value is not valid YAML ({reason}); quote it, e.g. "
                         f"{key}='{raw}'") from None


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict, in place. With ``cls`` (the config
    dataclass) each value is parsed by its field's type: text fields (``data.template``,
    ``model``...) take the text as written, other fields are parsed as YAML (numbers, lists,
    ``null``...); without it, every value is parsed as YAML."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FtlabError(f"override {item!r}: write it as key=value, e.g. lr=1e-4 or lora.r=16")
        *parents, leaf = key.split(".")
        if not all(parents) or not leaf:
            raise FtlabError(f"override {item!r}: {key!r} is not a key; write e.g. lora.r=16")
        node, typ, path = data, cls, []
        for p in parents:
            path.append(p)
            section = None
            if typ is not None and dataclasses.is_dataclass(typ):
                hints = typing.get_type_hints(typ)
                if p in hints:
                    section = _unwrap_optional(hints[p])
                    if not dataclasses.is_dataclass(section):
                        raise FtlabError(f"override {item!r}: {'.'.join(path)} is {_type_name(section)}, "
                                         f"not a section with keys; write {'.'.join(path)}=value")
            typ = section
            child = node.setdefault(p, {})
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise FtlabError(f"override {item!r}: {'.'.join(path)} is {child!r}, not a section with keys; "
                                 f"write {'.'.join(path)}=value")
            node = child
        hint = None
        if typ is not None and dataclasses.is_dataclass(typ):
            hint = typing.get_type_hints(typ).get(leaf)
        node[leaf] = _parse_value(raw, hint, item, key)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults <- YAML file <- overrides, validated into ``cls`` (completely: see :func:`check`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FtlabError(f"config file {path} not found (examples: src/ftlab/configs/, `ftlab train -c NAME`)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FtlabError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise FtlabError(f"{path}: cannot read the config ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise FtlabError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(data, list(overrides), cls), where=str(path or "config"))


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass."""
    return dataclasses.asdict(config)
