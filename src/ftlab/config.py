"""Typed, serialisable configs, loaded from YAML with ``key.sub=value`` overrides; the settings
sections of a training run live here too, so ``import ftlab.config`` needs neither torch nor numpy.

One pattern checks every config (peft's ``LoraConfig`` style). A config is a dataclass that
subclasses :class:`Settings`; whenever one is built (in code, by :func:`from_dict` /
:func:`load_config`, by ``dataclasses.replace``) its ``__post_init__`` checks it completely:

1. every field against its annotation (``int``, ``float``, ``Literal[...]``, ``list[str] | None``
   ...); nested sections are checked the same way;
2. every field against the value rule declared with it (``None`` passes: whether a field may be
   null is its annotation's business)::

       steps: int = setting(200, check=at_least(1))                  # config.steps: must be >= 1 (got 0)
       momentum: float = setting(0.0, check=in_unit_interval)         # ... must be in [0, 1) (got 1.5)
       lr: float = setting(1e-5, check=above(0), need="> 0 for optimizer {optimizer}")

   ``check`` is a predicate of the value; ``need`` completes "must be ..." (default: the
   predicate's own, see :func:`needs`) and may name other fields in braces;
3. the rules between fields: the class's :meth:`Settings.check_combinations`, which raises
   ``ConfigError(field, text)``.

A fault is a :class:`ConfigError`: one line naming the field, ``config.lr: must be > 0 for
optimizer adamw (got -0.1)``. Its prefix is the class's ``where`` for an object built in code
(``config`` for :class:`TrainConfig`, ``lora`` for :class:`LoraSettings`...), the YAML file (or
the class's ``where``) for one loaded by :func:`load_config`; :func:`check` (or ``.validate()``)
checks an object again, e.g. after a field was changed in place, under any prefix.

To add a field with a rule: declare it with ``setting(default, check=..., need=...)``, the check a
predicate below (:func:`at_least`, :func:`above`, :func:`in_unit_interval`, :func:`not_blank`...) or
a small ``def`` of your own marked with :func:`needs`; a rule that spans fields goes into the
class's ``check_combinations``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, TypeVar

import yaml

from ftlab.errors import FtlabError

T = TypeVar("T")
Check = Callable[[Any], bool]

Dtype = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
Optimizer = Literal["adamw", "sgd", "mezo", "zo-momentum", "zo-adam", "zo-sign", "sparse-mezo", "fzoo", "hizoo",
                    "lozo", "lozo-m", "zo-guided", "lowrank-fzoo", "mezo-svrg"]
CHUNK = 1 << 16  # default entries of z handled at once (256 KiB in fp32): bounds every temporary


# --------------------------------------------------------------------------- the mechanism

class ConfigError(FtlabError):
    """A config value that breaks its type or a rule: ``field`` (the dotted path below the object
    checked; ``""``: the object as a whole), ``text`` (what is wrong) and ``where`` (the name the
    object goes by, e.g. ``config`` or the YAML file)."""

    def __init__(self, field: str, text: str, where: str = "") -> None:
        self.field, self.text, self.where = field, text, where
        name = ".".join(part for part in (where, field) if part)
        super().__init__(f"{name}: {text}" if name else text)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.field, self.text, self.where)

    def at(self, where: str) -> ConfigError:
        """The same fault, with the object named ``where``."""
        return ConfigError(self.field, self.text, where)

    def within(self, name: str) -> ConfigError:
        """The fault of a section, seen from the object that holds it as field ``name``."""
        return ConfigError(f"{name}.{self.field}" if self.field else name, self.text, self.where)


def needs(text: str) -> Callable[[Check], Check]:
    """Mark a predicate with what its values must be (``"must be <text>"`` in a fault)."""
    def mark(check: Check) -> Check:
        check.need = text  # type: ignore[attr-defined]
        return check
    return mark


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | Any = MISSING, check: Check | None = None,
            need: str | None = None) -> Any:
    """A dataclass field (``default`` or ``factory`` as in :func:`dataclasses.field`) with a
    value rule: ``check(value)`` must hold, else the fault says ``must be <need> (got <value>)``."""
    if check is not None:
        need = need if need is not None else getattr(check, "need", None)
        if not need:
            raise TypeError(f"setting(check={getattr(check, '__name__', check)}) needs need=...: what the value "
                            "must be")
    return field(default=default, default_factory=factory, metadata={"check": check, "need": need})


def rule_of(f: dataclasses.Field) -> tuple[Check, str] | None:
    """The value rule ``(check, need)`` declared with :func:`setting` on field ``f`` (None: none)."""
    check = f.metadata.get("check")
    return None if check is None else (check, f.metadata["need"])


def at_least(bound: float) -> Check:
    """Values ``>= bound``."""
    @needs(f">= {bound}")
    def check(value: Any) -> bool:
        return value >= bound
    return check


def above(bound: float) -> Check:
    """Values ``> bound``."""
    @needs(f"> {bound}")
    def check(value: Any) -> bool:
        return value > bound
    return check


def every(check: Check) -> Check:
    """Non-empty lists whose every item passes ``check`` ("a non-empty list of values <its need>")."""
    @needs(f"a non-empty list of values {getattr(check, 'need', '')}".rstrip())
    def check_all(values: list[Any]) -> bool:
        return bool(values) and all(check(v) for v in values)
    return check_all


@needs("in [0, 1)")
def in_unit_interval(value: float) -> bool:
    return 0.0 <= value < 1.0


@needs("in (0, 1)")
def in_open_unit_interval(value: float) -> bool:
    return 0.0 < value < 1.0


@needs("in (0, 1] (a fraction, e.g. 0.05 for 5%)")
def in_fraction(value: float) -> bool:
    return 0.0 < value <= 1.0


@needs("cpu, cuda or cuda:N")
def device_name(value: str) -> bool:
    return re.fullmatch(r"cpu|cuda(:\d+)?", value) is not None


@needs("two numbers in [0, 1), e.g. [0.9, 0.999]")
def unit_pair(value: list[float]) -> bool:
    return len(value) == 2 and all(0.0 <= b < 1.0 for b in value)


def not_blank(value: str) -> bool:
    """Text with something besides spaces (give the field its own ``need``)."""
    return bool(value.strip())


def non_empty(value: Any) -> bool:
    """A list (or text) with at least one item (give the field its own ``need``)."""
    return len(value) > 0


@needs("two or more distinct, non-blank label words, e.g. [' no', ' yes']")
def distinct_words(value: list[str]) -> bool:
    return len(value) >= 2 and all(w.strip() for w in value) and len(set(value)) == len(value)


class Settings:
    """Base of the config dataclasses: checked completely when built (see the module docstring).

    ``where``: what faults call an object built in code (a class attribute, not a field)."""

    where: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        check(self)

    def validate(self, where: str | None = None) -> None:
        """Check again (e.g. after a field was changed in place), naming faults under ``where``
        (default: the class's ``where``); called by ``writes_run_dir`` before a run writes anything."""
        check(self, where)

    def check_combinations(self) -> None:
        """The rules between fields, run after every field passed its own: raise
        ``ConfigError(field, text)`` (``field`` ``""``: the object as a whole). None here."""


def _where_of(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return cls.where if issubclass(cls, Settings) else "config"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Fields(dict):
    """The fields of an object for ``need.format_map``: an unknown ``{name}`` stays as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def check(obj: Any, where: str | None = None) -> None:
    """Check a config dataclass completely: every field against its type (recursing into nested
    sections), then each field's rule, then the class's ``check_combinations``; raises a one-line
    :class:`ConfigError` naming the field under ``where`` (default: the class's ``where``), e.g.
    ``config.lr: must be > 0 for optimizer adamw (got -0.1)``."""
    try:
        _check(obj)
    except ConfigError as e:
        raise e.at(_where_of(obj) if where is None else where) from None


# Every float setting must be finite, and finite in float32 too (lr=1e300 would be inf there).
FLOAT32_MAX = 3.4028234663852886e38

# Seeds (every field named seed, *_seed or seeds, in every config) must lie in [0, 2^32): what
# numpy takes, and far enough below 2^64 that torch's seeds derived from them do not overflow.
SEED_LIMIT = 1 << 32


def _is_seed_field(name: str) -> bool:
    return name in ("seed", "seeds") or name.endswith("_seed")


def _check_seed(name: str, value: Any) -> None:
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v < SEED_LIMIT:
            raise ConfigError(name, f"must be a seed in [0, 2^32) (got {v})")


def _check(obj: Any) -> None:
    hints = _hints(type(obj))
    fields = dataclasses.fields(obj)
    for f in fields:
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            try:
                _check(value)
            except ConfigError as e:
                raise e.within(f.name) from None
        else:
            _coerce(value, hints[f.name], f.name)
            if _is_seed_field(f.name):
                _check_seed(f.name, value)
    for f in fields:
        rule = rule_of(f)
        value = getattr(obj, f.name)
        if rule is not None and value is not None and not rule[0](value):
            need = rule[1]
            if "{" in need:
                need = need.format_map(_Fields({g.name: getattr(obj, g.name) for g in fields}))
            raise ConfigError(f.name, f"must be {need} (got {value!r})")
    combinations = getattr(obj, "check_combinations", None)
    if callable(combinations):
        combinations()


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses; unknown keys
    are errors (a typo must not silently fall back to a default), and the result is checked
    completely (see :func:`check`), so a bad config fails here, in one line naming the field
    under ``where`` (default: the class's ``where``)."""
    where = _where_of(cls) if where is None else where
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping, got {data!r}", where)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError("", f"unknown key(s) {unknown}; valid keys: {sorted(names)}", where)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{key}")
        kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:  # raised by its __post_init__, under the class's own name
        raise e.at(where) from None
    if not isinstance(obj, Settings):
        check(obj, where)
    return obj


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return {"str": "text", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "")


def _union_args(hint: Any, alone: tuple[Any, ...]) -> tuple[Any, ...]:
    """The members of a union annotation (``X | None``, ``Optional[X]``), else ``alone``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return alone


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept ints and numeric strings for floats (YAML reads ``1e-4`` as a string) and check
    scalar, list-item and ``Literal`` types, so a bad override fails loudly."""
    allowed = _union_args(hint, (hint,))
    if value is None and type(None) in allowed:
        return None
    item_error: ConfigError | None = None
    for typ in allowed:
        if typ is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                continue
            if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):  # nan, inf (.inf in YAML), 1e39
                raise ConfigError(where, f"must be a finite number, within float32's range (|x| <= 3.4e38: the "
                                         f"optimizers compute in float32) (got {value!r})")
            return number
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
            except ConfigError as e:
                item_error = e
                continue
        if dataclasses.is_dataclass(typ) and isinstance(value, typ):
            return value
    if item_error is not None:
        raise item_error
    choices = [a for a in allowed if a is not type(None)]
    if len(choices) == 1 and typing.get_origin(choices[0]) is Literal:
        raise ConfigError(where, f"{value!r} is not {_type_name(choices[0])}")
    names = " or ".join([_type_name(a) for a in choices] + (["null"] if type(None) in allowed else []))
    shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    raise ConfigError(where, f"{value!r} is not a valid {shown} (expected {names})")


# --------------------------------------------------------------------------- the settings of a run

@dataclass
class DataConfig(Settings):
    """Which task, how it is phrased, and how it is split (the MeZO protocol by default:
    1000 train / 500 dev / 1000 test; ``k_per_class`` gives balanced k-shot train and dev)."""

    where = "data"

    task: str = setting("sentiment", check=not_blank, need="a task name or a .jsonl/.csv file")
    template: str | None = None
    options: list[str] | None = setting(None, check=distinct_words)
    n_train: int = setting(1000, check=at_least(0))
    n_dev: int = setting(500, check=at_least(0))
    n_test: int = setting(1000, check=at_least(0))
    k_per_class: int | None = setting(None, check=at_least(1), need=">= 1 (or null)")
    data_seed: int = 0
    max_length: int = setting(256, check=at_least(2))


@dataclass
class LoraSettings(Settings):
    """LoRA hyper-parameters: rank ``r``, scale ``alpha / r``, dropout on the adapter input, and
    the module names to adapt (``None``: the architecture's default, see
    ``ftlab.models.lora.DEFAULT_TARGET_MODULES``)."""

    where = "lora"

    r: int = setting(8, check=at_least(1))
    alpha: int = setting(16, check=above(0))
    dropout: float = setting(0.0, check=in_unit_interval)
    target_modules: list[str] | None = setting(None, check=non_empty,
                                               need="a non-empty list of module names (or null: the default)")


@dataclass
class PrefixSettings(Settings):
    """Prefix length and initialisation: ``"real_activations"`` uses the keys/values the base
    model computes for ``num_tokens`` random tokens (MeZO's ``init_by_real_act``); ``"random"``
    draws Gaussians with each layer's real-activation mean and std."""

    where = "prefix"

    num_tokens: int = setting(5, check=at_least(1))
    init: Literal["real_activations", "random"] = "real_activations"


@dataclass
class ZOSettings(Settings):
    """MeZO's knobs beyond lr and weight decay (see :class:`ftlab.zo.MeZO`), and those of its
    variants (see :mod:`ftlab.zo.variants`). Typical eps: 1e-3 (full), 1e-2 (LoRA), 1e-1 (prefix)."""

    where = "zo"

    eps: float = setting(1e-3, check=above(0))
    n_perturbations: int = setting(1, check=at_least(1))
    one_sided: bool = False
    distribution: Literal["gaussian", "rademacher"] = "gaussian"
    # strided: one view of the shared noise table per tensor, a fixed number of ops a step
    # (default) | table: the earlier chunked design (a loop over chunks) | torch: fresh draws.
    # See ftlab.zo.directions.
    generator: Literal["strided", "table", "torch"] = "strided"
    # Entries per row of z (strided) or per chunk (table, torch). Part of z's definition (a run
    # replays only with its own value). The strided generator's cost does not depend on it.
    chunk_size: int = setting(CHUNK, check=at_least(1))
    # Perturb inside module forwards so theta is restored exactly (None: on for bf16/fp16).
    exact: bool | None = None
    momentum: float = setting(0.9, check=in_unit_interval)  # zo-momentum: heavy-ball coefficient
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], check=unit_pair)  # zo-adam
    # sparse-mezo: fraction of each tensor's smallest-magnitude entries trained
    sparsity: float = setting(0.75, check=in_unit_interval)
    # fzoo: the N + 1 points of a step in one vmapped forward (LoRA or prefix: small trainable tensors)
    batched: bool = False
    # hizoo: weight of each step's curvature estimate in the moving average of the diagonal Hessian
    hessian_smoothing: float = setting(1e-8, check=in_open_unit_interval)
    # lozo, lozo-m: rank r of each weight matrix's perturbation U V^T, and the steps between redraws of V
    rank: int = setting(2, check=at_least(1))
    refresh_every: int = setting(50, check=at_least(1))
    # zo-guided (MeZO-GV): candidate perturbations a step, and the share of lowest-loss ones in the elite group
    pool_size: int = setting(16, check=at_least(2))
    elite_fraction: float = setting(0.5, check=in_open_unit_interval)
    # mezo-svrg: q, the steps from one full-batch estimate (and anchor) to the next; the examples in
    # that estimate (null: the whole training split, if small); the full-batch steps' lr over the others'
    svrg_every: int = setting(5, check=at_least(1))
    svrg_batch: int | None = setting(None, check=at_least(1),
                                     need=">= 1 (examples in the full-batch estimate; null: the whole training split)")
    svrg_full_lr_scale: float = setting(1.0, check=above(0))


@dataclass
class LocalSGDSettings(Settings):
    """Local SGD for first-order data parallelism (see :mod:`ftlab.local_sgd`): ``period`` is H,
    the local steps between weight averages (H_base for the quadratic rule; null: synchronous
    DDP), ``rule`` constant or quadratic (QSR: H = max(H_base, floor((alpha / lr) ** 2)) at the
    start of each round), and ``switch_step``: synchronous steps before Local SGD starts (post-local SGD)."""

    where = "local_sgd"

    period: int | None = setting(None, check=at_least(1),
                                 need=">= 1 (H, the local steps between averages; null: synchronous DDP)")
    rule: Literal["constant", "quadratic"] = "constant"
    alpha: float | None = setting(None, check=above(0))
    switch_step: int = setting(0, check=at_least(0))

    def check_combinations(self) -> None:
        if self.rule == "quadratic" and self.period is not None and self.alpha is None:
            raise ConfigError("alpha", "must be set (> 0) for rule=quadratic: H = max(period, floor((alpha/lr)^2)) "
                                       "(got None)")


_FIRST_ORDER = ("adamw", "sgd")  # the optimizers with a backward pass; the others are zeroth order
Reporter = Literal["tensorboard", "wandb"]
# Settings that change neither the training nor its results: not part of a run's folder name
# (and a run may resume with other values of them).
NOT_IN_RUN_NAME = ("output_dir", "report_to")


def run_folder(cfg: TrainConfig) -> str:
    """The folder of a run whose config names none: ``runs/<task>-<mode>-<optimizer>-<hash>``,
    the task's file stem (or built-in name) and the first 8 hex digits of the sha256 of the
    settings that differ from their defaults (``NOT_IN_RUN_NAME`` aside). One config always
    names one folder, also after an upgrade of ftlab that adds settings (at their defaults)."""
    changed = _changed(to_dict(cfg), _default_settings())
    settings = {k: v for k, v in changed.items() if k not in NOT_IN_RUN_NAME}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    task = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.data.task).stem).strip("-.") or "task"
    return f"runs/{task}-{cfg.mode}-{cfg.optimizer}-{digest}"


@functools.cache
def _default_settings() -> dict[str, Any]:
    return to_dict(TrainConfig(output_dir="unused"))


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that differ from ``defaults``, section by section."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key, MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            if section := _changed(value, default):
                out[key] = section
        elif value != default:
            out[key] = value
    return out


@dataclass
class TrainConfig(Settings):
    """One fine-tuning run. ``mode`` picks what is trained; ``optimizer`` how."""

    model: str = setting("smollm2-135m", check=not_blank, need="a model name or folder")
    dtype: Dtype = "float32"
    device: str = setting("cpu", check=not_blank, need="a device, e.g. cpu or cuda")
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
    lr: float = setting(1e-5, check=above(0), need="> 0 for optimizer {optimizer}")
    weight_decay: float = setting(0.0, check=at_least(0))
    momentum: float = setting(0.0, check=in_unit_interval)
    # AdamW's betas and eps (None: torch's defaults (0.9, 0.999) and 1e-8); the batch-size
    # scaling rules of ftlab.scaling change them.
    adam_betas: list[float] | None = setting(None, check=unit_pair)
    adam_eps: float | None = setting(None, check=above(0))
    max_grad_norm: float | None = setting(1.0, check=at_least(0), need=">= 0 (0 or null: no clipping)")
    # Zeroth-order steps with a NaN/inf loss are skipped (and logged); the run stops after this many.
    max_skipped_steps: int = setting(10, check=at_least(0))
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = setting(0, check=at_least(0))
    steps: int = setting(200, check=at_least(1))
    # The global batch of a step (over all processes and micro-batches).
    batch_size: int = setting(8, check=at_least(1))
    # Micro-batches a step's batch is evaluated in, one after the other (memory of one
    # micro-batch): first order accumulates gradients, zeroth order evaluates each perturbation
    # on all of them. batch_size must be a multiple of grad_accum x processes.
    grad_accum: int = setting(1, check=at_least(1))
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
    eval_every: int = setting(50, check=at_least(0), need=">= 0 (0: no dev evaluation)")
    eval_batch_size: int = setting(32, check=at_least(1))
    checkpoint_every: int = setting(50, check=at_least(0), need=">= 0 (0: only at the end)")
    # Which weights model/ holds and the test metrics are computed on: "last", the weights
    # training ended with, or "best", the ones of the best dev evaluation (needs eval_every and
    # data.n_dev > 0). results.json records which ("model", "model_step") beside the dev facts
    # ("best_step", "best_dev"); best.safetensors is written either way.
    keep: Literal["last", "best"] = "last"
    seed: int = 0
    # Separate seeds per source of randomness, for seed studies (None: ``seed``); ``seed`` alone
    # draws the train/dev split. order: batch order and dropout; init: new parameters (LoRA,
    # prefix); zo: the zeroth-order optimizer's perturbations.
    order_seed: int | None = None
    init_seed: int | None = None
    zo_seed: int | None = None
    # null: runs/<task>-<mode>-<optimizer>-<hash of the other settings> (see run_folder), so the
    # same settings resume the same folder and other settings get another one.
    output_dir: str | None = setting(None, check=not_blank, need="a folder path (or null: named from the config)")
    # Mirror every logged metric to TensorBoard (<output_dir>/tensorboard/) and/or Weights &
    # Biases (ftlab.reporting; the `report` extra). Empty: metrics.jsonl only.
    report_to: list[Reporter] = setting(factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_dir is None:
            self.output_dir = run_folder(self)

    def validate(self, where: str | None = None) -> None:
        """Check again, and that each reporter of ``report_to`` is installed (before a run writes anything)."""
        super().validate(where)
        for name in self.report_to:
            if importlib.util.find_spec(name) is None:
                raise ConfigError("report_to", f"{name} is not installed: pip install 'ftlab[report]' (or "
                                               f"pip install {name}), or remove it from report_to",
                                  _where_of(self) if where is None else where)

    def seed_of(self, kind: str) -> int:
        """The seed of one source of randomness (``"order"``, ``"init"`` or ``"zo"``)."""
        value = getattr(self, f"{kind}_seed")
        return self.seed if value is None else value

    def check_combinations(self) -> None:
        if self.lr * self.weight_decay >= 1:
            raise ConfigError("weight_decay", f"lr * weight_decay must be < 1: every step multiplies the weights by "
                                              f"1 - lr * weight_decay (got {self.lr:g} * {self.weight_decay:g})")
        self._objective_needs_zo()
        self._keep_needs_dev()
        self._scale_options()
        self._first_order_options()
        self._estimator_options()

    def _estimator_options(self) -> None:
        """What each zeroth-order estimator needs of the zo settings (said here, before a folder is
        written, rather than by its constructor inside the run)."""
        zo = self.zo
        if self.optimizer == "fzoo" and (zo.distribution != "rademacher" or zo.n_perturbations < 2):
            raise ConfigError("zo", "fzoo normalises its step by the std of N >= 2 one-sided Rademacher estimates: "
                                    f"set zo.distribution=rademacher zo.n_perturbations=8 (the paper's N; got "
                                    f"{zo.distribution}, {zo.n_perturbations})")
        if self.optimizer == "lowrank-fzoo" and zo.n_perturbations < 2:
            raise ConfigError("zo", "lowrank-fzoo normalises its step by the std of N >= 2 one-sided estimates: set "
                                    f"zo.n_perturbations=8 (got {zo.n_perturbations})")
        if self.optimizer == "hizoo" and (zo.one_sided or zo.distribution != "gaussian"):
            raise ConfigError("zo", "hizoo estimates curvature from L+, L- and L0 with gaussian z: set "
                                    "zo.one_sided=false zo.distribution=gaussian")
        if self.optimizer == "zo-guided" and (zo.one_sided or zo.n_perturbations != 1):
            raise ConfigError("zo", "zo-guided takes one central difference along its guiding vector: set "
                                    "zo.one_sided=false zo.n_perturbations=1 (its pool is zo.pool_size)")
        if zo.batched and (self.optimizer not in ("fzoo", "lowrank-fzoo") or self.mode == "full" or self.offload
                           or self.fsdp or self.objective != "loss" or self.grad_accum != 1):
            raise ConfigError("zo.batched", "evaluates fzoo's N + 1 points as one vmapped forward of stacked "
                                            "adapters: it needs optimizer=fzoo or lowrank-fzoo, mode=lora or prefix, "
                                            "objective=loss, grad_accum=1, and neither offload nor fsdp")

    def _objective_needs_zo(self) -> None:
        if self.objective not in ("loss", "quad") and self.optimizer in _FIRST_ORDER:
            raise ConfigError("objective", f"{self.objective!r} has no gradient; use a zeroth-order optimizer "
                                           f"(e.g. optimizer=mezo) or objective=loss (got optimizer={self.optimizer})")

    def _keep_needs_dev(self) -> None:
        if self.keep == "best" and not (self.eval_every and self.data.n_dev):
            raise ConfigError("keep", "'best' keeps the weights of the best dev evaluation: set eval_every > 0 and "
                                      f"data.n_dev > 0 (got {self.eval_every} and {self.data.n_dev}), or keep=last")

    def _scale_options(self) -> None:
        """grad_accum must divide the batch; device_map / offload are zeroth-order features (fsdp
        serves both), and the three are exclusive of one another."""
        if self.batch_size % self.grad_accum:
            raise ConfigError("grad_accum", f"{self.grad_accum} does not divide batch_size={self.batch_size} "
                                            f"(micro-batches must be equal); use a divisor of {self.batch_size}")
        chosen = [name for name, on in (("fsdp", self.fsdp), ("device_map", self.device_map is not None),
                                        ("offload", self.offload)) if on]
        if len(chosen) > 1:
            raise ConfigError("", f"{' and '.join(chosen)} cannot be combined; choose one way to place the model")
        placed = [name for name in chosen if name != "fsdp"]  # fsdp also shards first-order training
        if placed and self.optimizer in _FIRST_ORDER:
            raise ConfigError(placed[0], f"implemented for zeroth-order optimizers (e.g. optimizer=mezo); "
                                         f"got optimizer={self.optimizer}")

    def _first_order_options(self) -> None:
        """Local SGD, autocast and activation checkpointing are first-order features."""
        zo = self.optimizer not in _FIRST_ORDER
        if self.local_sgd.period is not None and zo:
            raise ConfigError("local_sgd", f"Local SGD averages first-order models; {self.optimizer} is zeroth order "
                                           f"and its data parallelism (plain torchrun) already exchanges one scalar "
                                           f"per step: set local_sgd.period=null, or use optimizer=sgd or adamw")
        if self.local_sgd.period is not None and self.fsdp:
            raise ConfigError("local_sgd", "Local SGD keeps a whole model per rank; it cannot be combined with fsdp")
        if self.autocast and zo:
            raise ConfigError("autocast", f"bf16 autocast is for first-order training; for {self.optimizer} "
                                          f"use dtype=bfloat16 (exact MeZO in bf16)")
        if self.autocast and self.dtype not in ("float32", "fp32"):
            raise ConfigError("autocast", f"autocast runs float32 weights in bf16; use dtype=float32 "
                                          f"(got dtype={self.dtype})")
        if self.gradient_checkpointing and self.mode == "prefix":
            raise ConfigError("gradient_checkpointing", "prefix tuning feeds its prefix through the layers' "
                                                        "key/value cache, which transformers' checkpointing drops; "
                                                        "use mode=lora or full, or set it to false")
        if self.gradient_checkpointing and zo:
            raise ConfigError("gradient_checkpointing", f"saves activations for a backward pass, and "
                                                        f"{self.optimizer} runs none; set gradient_checkpointing=false")


# YAML's spellings of null: an override of a text field that may be null takes these as null.
_NULLS = ("null", "Null", "NULL", "~", "")


def _unwrap_optional(hint: Any) -> Any:
    args = _union_args(hint, ())
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 else hint


def _is_text(hint: Any) -> tuple[bool, bool]:
    """``(takes text, may be null)``: a ``str`` or string-``Literal`` field (optionally ``| None``)."""
    args = _union_args(hint, (hint,))
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
    """Defaults <- YAML file <- overrides, validated into ``cls`` (completely: see :func:`check`);
    faults are named after the file, or after the class's ``where`` without one."""
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
    return from_dict(cls, apply_overrides(data, list(overrides), cls), where=str(path) if path else None)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass."""
    return dataclasses.asdict(config)
