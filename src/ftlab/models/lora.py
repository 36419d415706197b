"""LoRA adapters via peft, with per-architecture default target modules."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ftlab.config import LoraSettings
from ftlab.errors import FtlabError

# The attention projections LoRA adapts by default (the original paper's q,v choice), keyed by
# `config.model_type`. GPT-2 fuses q,k,v into one Conv1D; GPT-NeoX into one Linear.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "opt")},
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


def _adaptable(model: nn.Module) -> list[str]:
    """Full paths of the Linear / Conv1D layers of ``model`` (what LoRA can adapt)."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and name]


def adaptable_module_names(model: nn.Module) -> list[str]:
    """The distinct short names (last path component) of the Linear / Conv1D layers of ``model``."""
    return sorted({name.rsplit(".", 1)[-1] for name in _adaptable(model)})


def resolve_target_modules(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    """``settings.target_modules``, or the default for the model's architecture; every name
    must match a Linear or Conv1D layer of ``model``."""
    available = adaptable_module_names(model)
    if settings.target_modules is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise FtlabError(f"no default LoRA target modules for model type {model_type!r}; set "
                             f"lora.target_modules to some of its Linear layers: {available}")
        return list(DEFAULT_TARGET_MODULES[model_type])
    if not settings.target_modules:
        raise FtlabError(f"lora.target_modules is empty; name some of the Linear layers: {available}")
    # peft matches a target against the end of each module path, so "self_attn.q_proj" is fine too.
    paths = _adaptable(model)
    unknown = [t for t in settings.target_modules
               if not any(p == t or p.endswith("." + t) for p in paths)]
    if unknown:
        raise FtlabError(f"lora.target_modules {unknown} match no Linear layer of this model; "
                         f"available: {available}")
    return list(settings.target_modules)


def _check(settings: LoraSettings) -> None:
    if not (isinstance(settings.r, int) and settings.r > 0):
        raise FtlabError(f"lora.r must be a positive integer, got {settings.r!r}")
    if not settings.alpha > 0:
        raise FtlabError(f"lora.alpha must be positive, got {settings.alpha!r}")
    if not 0.0 <= settings.dropout < 1.0:
        raise FtlabError(f"lora.dropout must be in [0, 1), got {settings.dropout!r}")


def apply_lora(model: PreTrainedModel, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (B = 0, so the output is unchanged at first).

    Freezes every base weight; only the adapter matrices train. The model is modified in place
    (peft injects the adapter layers), so keep using the returned module.
    """
    settings = settings or LoraSettings()
    _check(settings)
    targets = resolve_target_modules(model, settings)
    # GPT-2's Conv1D stores weights transposed; peft must be told or it warns and flips it itself.
    transposed = any(isinstance(m, Conv1D) and any(name == t or name.endswith("." + t) for t in targets)
                     for name, m in model.named_modules())
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, fan_in_fan_out=transposed, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)
