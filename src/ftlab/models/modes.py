"""Training modes (full, LoRA, prefix): what to train, and saving/restoring the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftlab.errors import FtlabError, damaged
from ftlab.io import atomic_dir, atomic_write_json, verify_manifest, write_manifest
from ftlab.models.identity import BASE_FILE, base_folder, describe_base, weights_sha256
from ftlab.models.loading import load_model, quiet_progress, short_reason
from ftlab.models.lora import LoraSettings, apply_lora
from ftlab.models.prefix import PREFIX_CONFIG, PrefixModel, PrefixSettings

Mode = Literal["full", "lora", "prefix"]
MODES: tuple[str, ...] = ("full", "lora", "prefix")
_ADAPTER_CONFIG = "adapter_config.json"
_BASE_REMEDY = "copy it again from the run folder, or delete it to load without checking the base"


def prepare_model(model: PreTrainedModel, mode: Mode, *, lora: LoraSettings | None = None,
                  prefix: PrefixSettings | None = None, seed: int = 0) -> nn.Module:
    """Return the module to train for ``mode``, with everything else frozen.

    ``full``: ``model`` itself, all parameters trainable. ``lora``: a peft model with fresh
    adapters (``model`` is modified in place). ``prefix``: a :class:`PrefixModel` around the
    frozen ``model``, its prefix initialised with ``seed``.
    """
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode == "lora":
        return apply_lora(model, lora)
    if mode == "prefix":
        return PrefixModel(model, prefix, seed=seed)
    raise FtlabError(f"unknown training mode {mode!r}; choose one of {list(MODES)}")


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of ``module`` that require gradients (tied weights once)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def mode_of(module: nn.Module) -> Mode:
    """Which training mode produced ``module`` (see :func:`prepare_model`)."""
    if isinstance(module, PrefixModel):
        return "prefix"
    if isinstance(module, PeftModel):
        return "lora"
    if isinstance(module, PreTrainedModel):
        return "full"
    raise FtlabError(f"cannot save a {type(module).__name__}: expected a module from prepare_model")


def save_trained(module: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path, *,
                 record: dict | None = None) -> None:
    """Save a trained module to folder ``out_dir``, atomically: the whole model (full), the peft
    adapter (lora) or the prefix (prefix), with the tokenizer beside it (none if ``tokenizer`` is
    None). An adapter or prefix also gets ``ftlab_base.json`` (the base's name, weights SHA-256
    and dtype; see :mod:`ftlab.models.identity`), and the adapter config names the base by that
    portable name, never by a machine-local cache path. A manifest of the files' sha256 (and
    ``record``, plain JSON values) is checked by :func:`load_trained`."""
    mode = mode_of(module)
    base = describe_base(module) if mode != "full" else None
    with atomic_dir(out_dir) as tmp, quiet_progress():
        if mode == "prefix":
            module.write(tmp)
        else:
            module.save_pretrained(tmp)
        if mode == "lora":
            _rewrite_adapter_config(tmp / _ADAPTER_CONFIG, base_name=base["name"] if base else None)
        if base is not None:
            atomic_write_json(tmp / BASE_FILE, base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, **(record or {}))  # every file's sha256, checked by load_trained


def _rewrite_adapter_config(path: Path, *, base_name: str | None) -> None:
    """Name the base by ``base_name`` (peft writes the folder the base was loaded from: for an
    embedded model, a cache folder on this machine), and sort the module lists: peft keeps
    ``target_modules`` as a set, so its order (and the file's bytes) would change from one
    process to the next."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list) and all(isinstance(v, (str, int)) for v in config[key]):
            config[key] = sorted(config[key], key=str)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def trained_mode(path: str | Path) -> Mode:
    """The mode of a folder written by :func:`save_trained`, read from the files it holds."""
    path = Path(path)
    if (path / PREFIX_CONFIG).is_file():
        return "prefix"
    if (path / _ADAPTER_CONFIG).is_file():
        return "lora"
    if (path / "config.json").is_file():
        return "full"
    raise FtlabError(f"{path} is not a folder written by save_trained (it has no {PREFIX_CONFIG}, "
                     f"{_ADAPTER_CONFIG} or config.json)")


def load_trained(base_name_or_path: str, path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Restore a module saved by :func:`save_trained` (in eval mode) and its tokenizer.

    ``base_name_or_path`` is the model it was trained from (as for :func:`load_model`); a
    full fine-tune is self-contained, so it is loaded from ``path`` alone. An adapter or prefix
    whose ``ftlab_base.json`` records the base's weights hash is refused, in one line, on a base
    whose weight files hash otherwise. The tokenizer returned is the base's (as in training; the
    copy saved beside an adapter or prefix is for loading it without ftlab).
    """
    mode = trained_mode(path)
    # A folder written before manifests is taken as it is; files added to it later are ignored.
    verify_manifest(path, "restore the folder from a copy, or rerun the training", exact=False)
    if mode == "full":
        return load_model(str(path), dtype=dtype, device=device)
    check_base(base_name_or_path, path)
    base, tokenizer = load_model(base_name_or_path, dtype=dtype, device=device)
    if mode == "prefix":
        module: nn.Module = PrefixModel.from_pretrained(base, path)
    else:
        try:
            module = PeftModel.from_pretrained(base, str(path))
        except (RuntimeError, ValueError, KeyError) as e:  # shape or module-name mismatch
            raise FtlabError(f"{path}: the LoRA adapter does not fit {base_name_or_path!r}: "
                             f"{short_reason(e)}") from e
    return module.eval(), tokenizer


def check_base(base_name_or_path: str, path: str | Path) -> None:
    """Refuse ``base_name_or_path`` for the adapter or prefix in ``path`` when ``path``'s
    ``ftlab_base.json`` records a weights SHA-256 and the base's files (where they are on this
    machine) hash otherwise; nothing to check without a recorded hash or a local folder."""
    recorded = _read_base_file(Path(path))
    want = recorded.get("sha256")
    if not want:
        return
    folder = base_folder(base_name_or_path)
    got = weights_sha256(folder) if folder is not None else None
    if got is not None and got != want:
        raise FtlabError(f"{path} was trained on base {recorded.get('name')!r} (weights sha256 {want[:12]}...), but "
                         f"{base_name_or_path!r} has weights sha256 {got[:12]}...: pass the base it was trained on")


def recorded_base(path: str | Path) -> str | None:
    """The name of the base model an adapter or prefix folder records in ``ftlab_base.json``
    (e.g. ``smollm2-135m``), or None (a full model, or a folder saved before ftlab recorded it)."""
    name = _read_base_file(Path(path)).get("name")
    return name if isinstance(name, str) and name else None


def _read_base_file(path: Path) -> dict:
    file = path / BASE_FILE
    if not file.is_file():
        return {}  # saved before ftlab recorded its base
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(file, e, _BASE_REMEDY) from None
    if not isinstance(data, dict):
        raise damaged(file, ValueError(f"expected a JSON object, got {type(data).__name__}"), _BASE_REMEDY)
    return data
