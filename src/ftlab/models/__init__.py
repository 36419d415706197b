"""Models: loading (embedded GGUF models, local folders, hub names), LoRA, prefix tuning, and
the training modes built on them.

The settings dataclasses (:class:`LoraSettings`, :class:`PrefixSettings`) are those of
:mod:`ftlab.config`, re-exported here; everything else is imported on first access, so
``import ftlab.models`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ftlab.config import LoraSettings, PrefixSettings

if TYPE_CHECKING:
    from ftlab.models.loading import (
        DEFAULT_MODEL,
        EMBEDDED_MODELS,
        EmbeddedModel,
        is_converted,
        load_model,
        parse_device,
        parse_dtype,
    )
    from ftlab.models.lora import DEFAULT_TARGET_MODULES, apply_lora
    from ftlab.models.modes import (
        MODES,
        Mode,
        load_trained,
        mode_of,
        prepare_model,
        recorded_base,
        save_trained,
        trainable_parameters,
        trained_mode,
    )
    from ftlab.models.prefix import PrefixModel

_LAZY = {
    "loading": ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "is_converted", "load_model",
                "parse_device", "parse_dtype"],
    "lora": ["DEFAULT_TARGET_MODULES", "apply_lora"],
    "modes": ["MODES", "Mode", "load_trained", "mode_of", "prepare_model", "recorded_base", "save_trained",
              "trainable_parameters", "trained_mode"],
    "prefix": ["PrefixModel"],
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["LoraSettings", "PrefixSettings", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ftlab.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ftlab.models.{_WHERE[name]}"), name)
