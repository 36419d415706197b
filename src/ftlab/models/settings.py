"""The LoRA and prefix-tuning settings: plain dataclasses, importable without torch (the
config loader reads them to validate YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LoraSettings:
    """LoRA hyper-parameters: rank ``r``, scale ``alpha / r``, dropout on the adapter input, and
    the module names to adapt (``None``: the architecture's default, see
    ``ftlab.models.lora.DEFAULT_TARGET_MODULES``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class PrefixSettings:
    """Prefix length and initialisation: ``"real_activations"`` uses the keys/values the base
    model computes for ``num_tokens`` random tokens (MeZO's ``init_by_real_act``); ``"random"``
    draws Gaussians with each layer's real-activation mean and std."""

    num_tokens: int = 5
    init: Literal["real_activations", "random"] = "real_activations"
