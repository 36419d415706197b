"""ftlab inside other training frameworks: :mod:`ftlab.integrations.hf` (Hugging Face Trainer).

Imported lazily by name, so ``import ftlab.integrations`` does not load transformers' Trainer."""

from __future__ import annotations

from typing import Any

_HF = ("ZOTrainer", "ZOTrainerMixin", "ZOArguments", "PromptCollator", "prompt_accuracy")


def __getattr__(name: str) -> Any:
    if name in _HF:
        from ftlab.integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'ftlab.integrations' has no attribute {name!r}")


__all__ = list(_HF)
