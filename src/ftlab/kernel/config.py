"""The settings of ``ftlab kernel`` as one typed config (YAML + ``key=value`` overrides, like
``ftlab train``): the model and k-shot split a kernel is computed on, the kernel itself
(:class:`~ftlab.kernel.entk.KernelSpec`), and the fine-tuning run ``compare`` checks it against.

The training config of the run (or of the seeded adapters a kernel starts from) is built from
these fields directly by :meth:`KernelConfig.train_config`: one place says how a kernel's split
and weights are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ftlab.config import Settings, TrainConfig, from_dict
from ftlab.kernel.entk import KernelSpec


@dataclass
class CompareSettings(Settings):
    """The fine-tuning run ``ftlab kernel compare`` measures against the kernel: SGD is modelled
    by the SGD kernel, AdamW by the sign kernel; ``method`` is the kernel solver compared."""

    where = "compare"

    mode: Literal["full", "lora"] = "lora"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    method: Literal["regression", "svm", "logistic"] = "regression"


@dataclass
class KernelConfig(Settings):
    """A kernel computation (and its comparison with fine-tuning) on a balanced k-shot split.

    ``seed`` picks the k-shot train split and the LoRA initialisation; ``data_seed`` the test
    examples (fixed across seeds). ``lora_r`` sets the LoRA rank (alpha = 2 r) of ``params=lora``
    kernels and of LoRA runs."""

    model: str = "smollm2-135m"
    task: str = "sentiment"
    k: int = 16
    seed: int = 0
    n_test: int = 200
    data_seed: int = 0
    lora_r: int = 8
    device: str = "cpu"
    output_dir: str = "runs/kernel"
    kernel: KernelSpec = field(default_factory=KernelSpec)
    compare: CompareSettings = field(default_factory=CompareSettings)

    def train_config(self, mode: str | None = None, **fields: Any) -> TrainConfig:
        """The :class:`TrainConfig` of this split and model (``mode`` default: LoRA for a
        ``params=lora`` kernel, else full), with ``fields`` set on top; validated."""
        mode = mode or ("lora" if self.kernel.params == "lora" else "full")
        return from_dict(TrainConfig, {
            "model": self.model, "device": self.device, "seed": self.seed, "mode": mode,
            "data": {"task": self.task, "k_per_class": self.k, "n_test": self.n_test, "data_seed": self.data_seed,
                     "n_dev": 0, "max_length": self.kernel.max_length},
            "lora": {"r": self.lora_r, "alpha": 2 * self.lora_r}, **fields}, "kernel config")

    def compare_config(self) -> TrainConfig:
        """The fine-tuning run of ``compare``, in ``<output_dir>/run`` (checkpointed at the end)."""
        c = self.compare
        return self.train_config(c.mode, optimizer=c.optimizer, lr=c.lr, steps=c.steps, batch_size=c.batch_size,
                                 eval_every=0, checkpoint_every=c.steps, output_dir=f"{self.output_dir}/run")

    def identity(self) -> dict[str, Any]:
        """What a computed kernel belongs to (stored in its manifest; another one is refused)."""
        return {"model": self.model, "params": self.kernel.params, "lora_r": self.lora_r, "seed": self.seed,
                "k": self.k, "data_seed": self.data_seed, "n_test": self.n_test}
