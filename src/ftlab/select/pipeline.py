"""The LESS recipe end to end, and its baselines, driven by one typed config.

``run_pipeline(cfg)`` with ``cfg.method == "less"``: LoRA warm-up on a random p% of the pool
(one checkpoint per epoch) -> Adam features of the pool and SGD features of the targets at
every checkpoint -> streaming scores (lr-weighted cosine, subtask mean, max) -> top-k.
``"random"`` and ``"representation"`` replace the first three steps by their baseline. Output
folder::

    warmup/epoch-<e>/                 LoRA tensors + AdamW moments by name (less)
    features/{train,target}/epoch-<e>/ datastores (less); representations/{train,target}/ (representation)
    selected.jsonl, scores.csv        the selection (id, source, line, score, rank) and all scores
    selected_data.jsonl               the selected examples themselves (prompt/messages, response), best first
    selection.png                     score distribution and the source tasks of the selection
    summary.json                      counts, skipped ids, the selection's task families

Every stage resumes: rerunning a killed command redoes only what is missing.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ftlab.config import (
    ConfigError,
    LoraSettings,
    Settings,
    above,
    at_least,
    device_name,
    in_fraction,
    needs,
    not_blank,
    setting,
)
from ftlab.distributed import barrier, init_from_env, is_main, rank_device
from ftlab.errors import FtlabError
from ftlab.grads.projection import KINDS as PROJECTION_KINDS
from ftlab.grads.projection import ProjectionSpec, Projector
from ftlab.io import atomic_file, atomic_write_json
from ftlab.models import load_model, parse_device, prepare_model, trainable_parameters
from ftlab.plots import optional, pyplot, save_figure
from ftlab.runs import writes_run_dir
from ftlab.select.baselines import random_scores, representation_scores, representation_store
from ftlab.select.data import InstructionExample, load_instructions
from ftlab.select.datastore import DTYPES as FEATURE_DTYPES
from ftlab.select.datastore import Datastore
from ftlab.select.features import AdamState, collect_features
from ftlab.select.scoring import less_scores, select_top, write_selection
from ftlab.select.warmup import (
    WarmupCheckpoint,
    WarmupSettings,
    list_checkpoints,
    load_adam_state,
    load_checkpoint_into,
    run_warmup,
)

METHODS = ("less", "random", "representation")
SPARSITY = ProjectionSpec.sparsity  # the sparse sketch's nonzeros per input coordinate (dim_out must be a multiple)


@needs(f"one of {', '.join(FEATURE_DTYPES)} (the datastores' storage types)")
def _feature_dtype(value: str) -> bool:
    return value in FEATURE_DTYPES


@needs(f"one of {', '.join(PROJECTION_KINDS)}")
def _projection_kind(value: str) -> bool:
    return value in PROJECTION_KINDS


@needs("float32, bfloat16 or float16")
def _model_dtype(value: str) -> bool:
    return value.lower() in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


@dataclass
class SelectConfig(Settings):
    """One data-selection run.

    Attributes:
        pool, targets: JSONL instruction files (see :mod:`ftlab.select.data`); targets are
            grouped by their ``task`` field (their file name when absent).
        method: ``less``, ``random`` or ``representation``.
        attn_implementation: ``eager`` lets ``vmap`` batch the per-example gradients of
            non-LoRA trainable tensors (SDPA falls back to a loop there); LoRA weights take the
            hook path, which works with any attention. ``None`` keeps the model's default.
        projection_dim, projection_kind, projection_seed: the random projection (LESS: 8192).
        percentage / top_k: how much to select (exactly one of them set).
        curvature_damping: null (LESS) or lambda > 0: TRAK-style inverse-curvature scoring.
    """

    pool: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    output_dir: str = setting("runs/less", check=not_blank, need="a folder path")
    method: str = "less"
    model: str = setting("smollm2-135m", check=not_blank, need="a model name or folder")
    dtype: str = setting("float32", check=_model_dtype)
    device: str = setting("cpu", check=device_name)
    attn_implementation: str | None = "eager"
    lora: LoraSettings = field(default_factory=LoraSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    projection_dim: int = setting(8192, check=at_least(1), need=">= 1 (LESS: 8192)")
    projection_kind: str = setting("sparse", check=_projection_kind)
    projection_seed: int = 0
    feature_dtype: str = setting("float16", check=_feature_dtype)
    batch_size: int = setting(8, check=at_least(1))
    max_length: int = setting(256, check=at_least(2))
    percentage: float | None = setting(0.05, check=in_fraction)
    top_k: int | None = setting(None, check=at_least(1), need=">= 1 (or null, with percentage set)")
    # null: LESS as published; lambda > 0: queries preconditioned by the inverse damped second moment
    # of the pool's features (TRAK-style; see ftlab.select.scoring), relative to its mean diagonal
    curvature_damping: float | None = setting(None, check=above(0), need="> 0 (e.g. 0.1), or null")
    seed: int = 0

    def check_combinations(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown selection method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.percentage is None) == (self.top_k is None):
            raise ConfigError("", "set exactly one of percentage (e.g. 0.05) and top_k (and the other to null)")
        if self.projection_kind == "sparse" and self.projection_dim % SPARSITY:
            raise ConfigError("projection_dim", f"must be a multiple of {SPARSITY} for projection_kind=sparse (its "
                                                f"nonzeros per input coordinate; got {self.projection_dim})")


def check_config(cfg: SelectConfig) -> None:
    """Raise a one-line :class:`FtlabError` unless ``cfg`` can run: checked (see
    :class:`SelectConfig`), with pool files, and target files unless ``method=random`` (a config
    without them is valid: it still builds the LoRA model and the projection)."""
    cfg.validate()
    parse_device(rank_device(cfg.device))  # a GPU that is not there is refused before anything is written
    if not cfg.pool:
        raise ConfigError("pool", "no pool files; set pool=[pool.jsonl, ...]", cfg.where)
    if not cfg.targets and cfg.method != "random":
        raise ConfigError("targets", "the target set is empty; set targets=[target.jsonl, ...]", cfg.where)


def load_lora_model(cfg: SelectConfig, model: nn.Module | None = None, tokenizer: Any = None,
                    ) -> tuple[nn.Module, Any]:
    """The model of ``cfg`` (or the given one) with fresh LoRA adapters seeded by ``cfg.seed``."""
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=rank_device(cfg.device),
                                      attn_implementation=cfg.attn_implementation)
    elif cfg.attn_implementation is not None:
        model.set_attn_implementation(cfg.attn_implementation)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
        torch.manual_seed(cfg.seed)
        return prepare_model(model, "lora", lora=cfg.lora), tokenizer


def projector_for(cfg: SelectConfig, module: nn.Module) -> Projector:
    """The projection of ``cfg`` for the trainable entries of ``module``."""
    dim_in = sum(p.numel() for _, p in trainable_parameters(module))
    spec = ProjectionSpec(dim_in=dim_in, dim_out=cfg.projection_dim, seed=cfg.projection_seed, kind=cfg.projection_kind)
    return Projector(spec, rank_device(cfg.device))


@dataclass
class FeatureStores:
    """One feature datastore per checkpoint, each checkpoint's lr weight, and the ids skipped
    because they have no response tokens."""

    stores: list[Datastore]
    lr_weights: list[float]
    skipped: list[str]


def gradient_features(cfg: SelectConfig, module: nn.Module, tokenizer: Any, examples: Sequence[InstructionExample],
                      checkpoints: Sequence[WarmupCheckpoint], grad_type: str, name: str,
                      progress: bool = True) -> FeatureStores:
    """Features of ``examples`` at every checkpoint (``adam`` for the pool, ``sgd`` for targets),
    in ``<output_dir>/features/<name>/<checkpoint>``."""
    projector = projector_for(cfg, module)
    out = FeatureStores([], [], [])
    for ckpt in checkpoints:
        load_checkpoint_into(module, ckpt)
        adam = AdamState(load_adam_state(ckpt.path), ckpt.betas, ckpt.eps)
        result = collect_features(module, tokenizer, examples,
                                  Path(cfg.output_dir) / "features" / name / ckpt.path.name,
                                  grad_type=grad_type, adam=adam, projector=projector, model_name=cfg.model,
                                  checkpoint=ckpt.path.name, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                  dtype=cfg.feature_dtype, extra={"mean_lr": ckpt.mean_lr}, progress=progress)
        out.stores.append(result.store)
        out.lr_weights.append(ckpt.mean_lr)
        out.skipped = result.skipped
    return out


def _check_rows_are_of(ids: Sequence[str], examples: Sequence[InstructionExample], where: Any, files: str) -> None:
    """Raise unless every feature row ``ids`` (of store ``where``) is an example of ``examples``."""
    known = {ex.id for ex in examples}
    missing = [i for i in ids if i not in known]
    if missing:
        raise FtlabError(f"{where} holds features of {len(missing)} examples that are not in the {files} files (e.g. "
                         f"{missing[0]!r}); give the files the features were computed for, or recompute them")


def groups_of(store: Datastore, examples: Sequence[InstructionExample]) -> list[str]:
    """The subtask of each row of a target store."""
    _check_rows_are_of(store.ids, examples, store.path, "targets")
    task = {ex.id: ex.task for ex in examples}
    return [task[i] for i in store.ids]


def score_pool(cfg: SelectConfig, pool: Sequence[InstructionExample], targets: Sequence[InstructionExample],
               model: nn.Module | None = None, tokenizer: Any = None,
               progress: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, scores, skipped ids)`` of the pool under ``cfg.method``."""
    check_config(cfg)
    out = Path(cfg.output_dir)
    if cfg.method == "random":
        return [ex.id for ex in pool], random_scores(len(pool), cfg.seed), []
    if cfg.method == "representation":
        if model is None:
            model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=rank_device(cfg.device))
        kw = dict(model_name=cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length, progress=progress)
        train = representation_store(model, tokenizer, pool, out / "representations" / "train", **kw)
        target = representation_store(model, tokenizer, targets, out / "representations" / "target", **kw)
        return train.ids, representation_scores(train, target, groups_of(target, targets)), []
    module, tokenizer = load_lora_model(cfg, model, tokenizer)
    # Under torchrun rank 0 warms up alone; the feature passes are then split over the ranks.
    if init_from_env(cfg.device)[0] == 0:
        run_warmup(module, tokenizer, pool, cfg.warmup, out / "warmup", max_length=cfg.max_length, progress=progress)
    barrier()
    checkpoints = checkpoints_of(cfg)
    train = gradient_features(cfg, module, tokenizer, pool, checkpoints, "adam", "train", progress)
    target = gradient_features(cfg, module, tokenizer, targets, checkpoints, "sgd", "target", progress)
    return *less_from_stores(cfg, train, target, targets, progress), sorted(train.skipped + target.skipped)


def less_from_stores(cfg: SelectConfig, train: FeatureStores, target: FeatureStores,
                     targets: Sequence[InstructionExample], progress: bool = True) -> tuple[list[str], np.ndarray]:
    """``(ids, scores)``: LESS scores of the pool rows of ``train`` against ``target``."""
    scores = less_scores(train.stores, target.stores, train.lr_weights, groups_of(target.stores[0], targets),
                         progress=progress, curvature_damping=cfg.curvature_damping)
    return train.stores[0].ids, scores


def stored_features(cfg: SelectConfig, name: str) -> FeatureStores:
    """The complete feature stores ``<output_dir>/features/<name>/<checkpoint>`` of every
    warm-up checkpoint (written by an earlier features pass)."""
    ckpts = checkpoints_of(cfg)
    stores = [Datastore.open(Path(cfg.output_dir) / "features" / name / c.path.name) for c in ckpts]
    return FeatureStores(stores, [c.mean_lr for c in ckpts], [])


def write_outputs(cfg: SelectConfig, pool: Sequence[InstructionExample], ids: list[str], scores: np.ndarray,
                  skipped: list[str]) -> dict[str, Any]:
    """Select the top examples and write every output file; returns the summary."""
    out = Path(cfg.output_dir)
    _check_rows_are_of(ids, pool, out, "pool")
    rows = select_top(scores, ids, k=cfg.top_k, fraction=cfg.percentage)
    write_selection(out / "selected.jsonl", out / "scores.csv", ids, scores, rows)
    by_id = {ex.id: ex for ex in pool}
    chosen = [by_id[ids[r]] for r in rows]
    with atomic_file(out / "selected_data.jsonl") as f:
        for ex, r in zip(chosen, rows):
            f.write(json.dumps({"messages": [*ex.messages, {"role": "assistant", "content": ex.response}],
                                "task": ex.task, "family": ex.family, "id": ex.id,
                                "score": float(scores[r])}, ensure_ascii=False) + "\n")
    summary = {"method": cfg.method, "n_pool": len(pool), "n_scored": len(ids), "n_selected": len(rows),
               "skipped_no_target_tokens": skipped,
               "families": dict(collections.Counter(ex.family for ex in chosen).most_common()),
               "tasks": dict(collections.Counter(ex.task for ex in chosen).most_common())}
    plot_selection(scores, rows, [ex.family for ex in chosen], out / "selection.png", cfg.method)
    atomic_write_json(out / "summary.json", summary)
    return summary


@optional
def plot_selection(scores: np.ndarray, selected: Sequence[int], families: Sequence[str], png: str | Path,
                   method: str) -> Path | None:
    """PNG with the score histogram (selection threshold marked) and the selection's task families."""
    fig, (ax_hist, ax_bar) = pyplot().subplots(1, 2, figsize=(11, 4))
    ax_hist.hist(scores, bins=min(50, max(5, len(scores) // 10)), color="tab:blue", alpha=0.8)
    if len(selected):
        ax_hist.axvline(float(np.min(scores[list(selected)])), color="tab:red", ls="--", label="selection threshold")
        ax_hist.legend()
    ax_hist.set(xlabel="score", ylabel="examples", title=f"{method} scores (n={len(scores)})")
    counts = collections.Counter(families).most_common()
    ax_bar.barh([c[0] for c in counts][::-1], [c[1] for c in counts][::-1], color="tab:green")
    ax_bar.set(xlabel="selected examples", title=f"Source task families of the {len(selected)} selected")
    fig.tight_layout()
    return save_figure(fig, png, dpi=110)


@writes_run_dir("select", "cfg.output_dir", validate=check_config)  # rank 0 claims + locks
def run_pipeline(cfg: SelectConfig, model: nn.Module | None = None, tokenizer: Any = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run the selection of ``cfg`` end to end (resumable) and write its outputs; returns the
    summary (``{}`` on the ranks other than 0 under ``torchrun``).

    ``model``/``tokenizer`` (optional) replace loading ``cfg.model``; the LESS method adds LoRA
    adapters to ``model`` in place.
    """
    check_config(cfg)
    pool = load_instructions(cfg.pool)
    targets = load_instructions(cfg.targets) if cfg.targets else []
    overlap = {ex.id for ex in pool} & {ex.id for ex in targets}
    if overlap:
        raise FtlabError(f"pool and targets share files (e.g. {sorted(overlap)[0]}); keep targets out of the pool")
    ids, scores, skipped = score_pool(cfg, pool, targets, model, tokenizer, progress)
    if not is_main():  # under torchrun every rank scores; rank 0 alone writes the outputs
        return {}
    return write_outputs(cfg, pool, ids, scores, skipped)


def checkpoints_of(cfg: SelectConfig) -> list[WarmupCheckpoint]:
    """The warm-up checkpoints already written under ``cfg.output_dir``."""
    found = list_checkpoints(Path(cfg.output_dir) / "warmup")
    if not found:
        raise FtlabError(f"no warm-up checkpoints in {Path(cfg.output_dir) / 'warmup'}; run the warm-up first")
    return found
