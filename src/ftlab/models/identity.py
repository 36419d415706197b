"""Which base model a saved adapter or prefix needs: its name as the user gave it (an embedded
model name such as ``smollm2-135m``, a hub name or a folder) and a SHA-256 of its weight files.

A LoRA or prefix folder holds only the trained tensors; :func:`ftlab.models.save_trained` records
its base here (``ftlab_base.json``) so that the folder is portable (no machine-local cache path)
and :func:`ftlab.models.load_trained` can refuse a base with other weights. The weights hash is
over the base folder's weight files (their names and bytes), so it does not depend on the dtype
the model was loaded in; each file's digest is cached under ``cache_dir()/sha256/`` by its path,
size and modification time, so a model's files are read once per machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from ftlab.io import atomic_write_text, cache_dir
from ftlab.models.loading import EMBEDDED_MODELS, converted_folder

BASE_FILE = "ftlab_base.json"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # the first pattern with files is the weights


def base_of(module: nn.Module) -> nn.Module:
    """The pretrained model under a peft or prefix wrapper (``module`` itself if unwrapped)."""
    from ftlab.models.prefix import PrefixModel

    if isinstance(module, PrefixModel):
        return module.base_model
    if hasattr(module, "get_base_model"):  # peft
        return module.get_base_model()
    return module


def base_name(name_or_path: str) -> str:
    """The portable name of a base: the embedded model's name for its cached conversion folder,
    else ``name_or_path`` as given (a hub name or the user's folder)."""
    path = Path(name_or_path)
    if path.parent.name == "models" and path.name in EMBEDDED_MODELS:
        try:
            if path.resolve() == (cache_dir() / "models" / path.name).resolve():
                return path.name
        except OSError:
            pass
    return name_or_path


def base_folder(name_or_path: str) -> Path | None:
    """The local folder of a base model's files: an embedded model's conversion, a folder, or a
    hub model already in the local hub cache; None where there is none (nothing is downloaded)."""
    if name_or_path in EMBEDDED_MODELS:
        return converted_folder(name_or_path)
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a hub name, or not cached: no folder to hash
        return None


def weights_sha256(folder: Path) -> str | None:
    """SHA-256 over a model folder's weight files (``*.safetensors``, else ``*.bin``): their
    names and each file's own digest, in name order; None if the folder has no weight files."""
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            total = hashlib.sha256()
            for f in files:
                total.update(f"{f.name}\0{_file_sha256(f)}\n".encode())
            return total.hexdigest()
    return None


def _file_sha256(path: Path) -> str:
    """The SHA-256 of one file, cached by its resolved path, size and modification time."""
    real = path.resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir() / "sha256" / key
    try:
        digest = cached.read_text(encoding="ascii").strip()
        if len(digest) == 64:
            return digest
    except (OSError, UnicodeDecodeError):
        pass
    h = hashlib.sha256()
    with real.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, h.hexdigest() + "\n")
    return h.hexdigest()


def describe_base(module: nn.Module) -> dict[str, Any]:
    """``{name, sha256, dtype}`` of the base under ``module``, from the folder it was loaded from
    (``name_or_path``). A model built in memory has no name and no hash (both None)."""
    base = base_of(module)
    source = str(getattr(base, "name_or_path", "") or "")
    folder = Path(source) if source and Path(source).is_dir() else (base_folder(source) if source else None)
    dtype = next((str(p.dtype).removeprefix("torch.") for p in base.parameters()), None)
    return {"name": base_name(source) if source else None,
            "sha256": weights_sha256(folder) if folder is not None else None, "dtype": dtype}
