"""Settings of the zeroth-order optimizers (a config section, no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CHUNK = 1 << 16  # default entries of z handled at once (256 KiB in fp32): bounds every temporary


@dataclass
class ZOSettings:
    """MeZO's knobs beyond lr and weight decay (see :class:`ftlab.zo.MeZO`), and those of its
    variants (see :mod:`ftlab.zo.variants`). Typical eps: 1e-3 (full), 1e-2 (LoRA), 1e-1 (prefix)."""

    eps: float = 1e-3
    n_perturbations: int = 1
    one_sided: bool = False
    distribution: Literal["gaussian", "rademacher"] = "gaussian"
    # strided: one view of the shared noise table per tensor, a fixed number of ops a step
    # (default) | table: the earlier chunked design (a loop over chunks) | torch: fresh draws.
    # See ftlab.zo.directions.
    generator: Literal["strided", "table", "torch"] = "strided"
    # Entries per row of z (strided) or per chunk (table, torch). Part of z's definition (a run
    # replays only with its own value). The strided generator's cost does not depend on it.
    chunk_size: int = CHUNK
    # Perturb inside module forwards so theta is restored exactly (None: on for bf16/fp16).
    exact: bool | None = None
    momentum: float = 0.9  # zo-momentum: heavy-ball coefficient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # zo-adam
    sparsity: float = 0.75  # sparse-mezo: fraction of each tensor's smallest-magnitude entries trained
