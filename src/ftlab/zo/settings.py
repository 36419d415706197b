"""Settings of the zeroth-order optimizers (a config section, no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ZOSettings:
    """MeZO's knobs beyond lr and weight decay (see :class:`ftlab.zo.MeZO`), and those of its
    variants (see :mod:`ftlab.zo.variants`). Typical eps: 1e-3 (full), 1e-2 (LoRA), 1e-1 (prefix)."""

    eps: float = 1e-3
    n_perturbations: int = 1
    one_sided: bool = False
    distribution: str = "gaussian"  # gaussian | rademacher
    generator: str = "table"  # table (shared noise table, fast) | torch (fresh draws)
    # Perturb inside module forwards so theta is restored exactly (None: on for bf16/fp16).
    exact: bool | None = None
    momentum: float = 0.9  # zo-momentum: heavy-ball coefficient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # zo-adam
    sparsity: float = 0.75  # sparse-mezo: fraction of each tensor's smallest-magnitude entries trained
