"""``ftlab tint build``: build a TinT from an inner model, check its one forward pass against the
reference step on a sample context, and measure its size and cost beside the inner model's."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftlab.config import ConfigError, Settings, at_least, setting, to_dict
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json
from ftlab.memory import lifetime_peak_bytes
from ftlab.tint.construct import TintConfig, build_tint
from ftlab.tint.inner import forward, inner_from_hf
from ftlab.tint.reference import Approximations, approximate_step, whole_context_mask


@dataclass
class TintBuildConfig(Settings):
    """A TinT (``tint``) of ``model``, checked and timed on a random context of ``n_tokens``
    tokens whose first ``n_train`` are the training part."""

    where = "tint build config"

    model: str = "smollm2-135m"
    tint: TintConfig = field(default_factory=TintConfig)
    n_tokens: int = 128
    n_train: int = 96
    seed: int = 0
    repeats: int = setting(2, check=at_least(1))

    def check_combinations(self) -> None:
        if not 2 <= self.n_train < self.n_tokens:
            raise ConfigError("n_train", f"must lie in 2..n_tokens-1 = {self.n_tokens - 1} (got {self.n_train}); "
                                         "the context needs a training and a test part")


def _peak_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return lifetime_peak_bytes() / 2**20


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(cfg: TintBuildConfig, model=None) -> dict:
    """Parameters, peak-memory growth and seconds of one forward: the inner model (plain forward
    of the context), the reference step, and the TinT; plus the TinT's largest deviation from the
    reference step's test logits. Memory is the growth of the process's peak resident set,
    measured in that order (inner, then TinT), so each number is what that stage added."""
    if model is None:
        from ftlab.models import load_model
        model, _ = load_model(cfg.model)
    inner = inner_from_hf(model, torch.float32)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, inner.spec.vocab, (cfg.n_tokens,), generator=g)
    mask = whole_context_mask(ids, cfg.n_train)
    tc = cfg.tint
    out: dict = {"inner": {"parameters": inner.n_parameters(), "layers": inner.spec.n_layers}}
    base = _peak_mib()
    with torch.no_grad():
        out["inner"]["seconds"] = _best_seconds(lambda: forward(inner, ids), cfg.repeats)
    out["inner"]["peak_mib_growth"] = _peak_mib() - base
    approx = Approximations(True, tc.finite_diff_n, True)
    ref = approximate_step(inner, ids, cfg.n_train, mask, tc.k, tc.inner_lr, approx)
    out["reference_step"] = {"seconds": _best_seconds(
        lambda: approximate_step(inner, ids, cfg.n_train, mask, tc.k, tc.inner_lr, approx), cfg.repeats)}
    base = _peak_mib()
    t0 = time.perf_counter()
    tint = build_tint(inner, tc)
    build_s = time.perf_counter() - t0
    got = tint(ids, cfg.n_train, mask)
    counts = tint.n_parameters()
    out["tint"] = {**counts, "hidden_size": tint.hidden_size, "n_prefixes": tc.n_prefixes,
                   "prefix_tokens": len(tint.banks) * tc.n_prefixes, "build_seconds": build_s,
                   "seconds": _best_seconds(lambda: tint(ids, cfg.n_train, mask), cfg.repeats),
                   "peak_mib_growth": _peak_mib() - base}
    scale = float(ref.test_logits.abs().max())
    out["check"] = {"max_abs_diff": float((got - ref.test_logits).abs().max()), "logit_scale": scale,
                    "same_argmax": bool((got.argmax(-1) == ref.test_logits.argmax(-1)).all())}
    out["tokens"] = {"total": cfg.n_tokens, "train": cfg.n_train}
    return out


# The top-level keys of the JSON that ``ftlab tint build --output`` writes (see write_output).
OUTPUT_KEYS = frozenset({"config", "inner", "reference_step", "tint", "check", "tokens"})


def _is_earlier_output(path: Path) -> bool:
    """Whether file ``path`` is the JSON of an earlier ``ftlab tint build --output``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and OUTPUT_KEYS <= data.keys()


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse ``--output`` before anything is measured unless it can take the JSON file: a new
    file in a folder (or in folders still to be created), or, with ``overwrite``, the file of an
    earlier build. A folder, another file, or a path under a file is refused in one line; nothing
    is deleted."""
    path = Path(path)
    if path.is_dir():
        raise FtlabError(f"--output {path} is a folder; give the path of a JSON file, e.g. --output build.json "
                         "(ftlab never deletes a folder it did not create)")
    if path.exists() or path.is_symlink():
        if not (path.is_file() and _is_earlier_output(path)):
            raise FtlabError(f"--output {path} exists and is not the JSON of an earlier tint build; choose another "
                             "file (ftlab never replaces a file it did not write)")
        if not overwrite:
            raise FtlabError(f"--output {path} holds an earlier tint build; pass --overwrite to replace it, or "
                             "choose another file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FtlabError(f"--output {path}: {parent} is a file, not a folder; give the path of a JSON file in a "
                         "folder")
    return path


def write_output(path: str | Path, cfg: TintBuildConfig, measured: dict[str, Any], overwrite: bool = False) -> None:
    """Write ``{"config": cfg, **measured}`` to JSON file ``path`` atomically (checked again
    by :func:`check_output` first, in case the path changed while the build ran)."""
    atomic_write_json(check_output(path, overwrite), {"config": to_dict(cfg), **measured})
