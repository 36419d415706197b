"""Settings of the zeroth-order optimizers (a config section, no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

CHUNK = 1 << 16  # default entries of z handled at once (256 KiB in fp32): bounds every temporary


@dataclass
class ZOSettings:
    """MeZO's knobs beyond lr and weight decay (see :class:`ftlab.zo.MeZO`), and those of its
    variants (see :mod:`ftlab.zo.variants`). Typical eps: 1e-3 (full), 1e-2 (LoRA), 1e-1 (prefix)."""

    eps: float = 1e-3
    n_perturbations: int = 1
    one_sided: bool = False
    distribution: str = "gaussian"  # gaussian | rademacher
    generator: str = "table"  # table (shared noise table, fast) | torch (fresh draws)
    # Entries of z handled at a time. Part of z's definition (a run replays only with its own
    # value). Small bounds the temporaries on CPU; on a GPU each chunk costs a kernel launch, so
    # raise it there (table generator: chunks are views of the table, no temporaries at all).
    chunk_size: int = CHUNK
    # Perturb inside module forwards so theta is restored exactly (None: on for bf16/fp16).
    exact: bool | None = None
    momentum: float = 0.9  # zo-momentum: heavy-ball coefficient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # zo-adam
    sparsity: float = 0.75  # sparse-mezo: fraction of each tensor's smallest-magnitude entries trained
