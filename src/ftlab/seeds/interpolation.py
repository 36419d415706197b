"""Linear mode connectivity between two fine-tuned runs: the metric along
``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` of the *trainable* tensors (the frozen base
model is shared by both runs; for LoRA the adapters' A and B are interpolated, not their product).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ftlab import objectives
from ftlab.config import TrainConfig, from_dict
from ftlab.errors import FtlabError
from ftlab.evaluate import model_device
from ftlab.models import load_model, prepare_model, trainable_parameters
from ftlab.objectives import Encoder
from ftlab.rundir import RunDir
from ftlab.seeds.stats import interpolation_barrier
from ftlab.tasks import Example, TaskSpec

ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def accuracy_and_loss(module: nn.Module, encoder: Encoder, examples: Sequence[Example],
                      batch_size: int = 32) -> dict[str, float]:
    """Accuracy and mean cross-entropy over option scores (the training loss) on ``examples``
    (classification tasks), from one forward per batch."""
    if encoder.spec.kind != "classification":
        raise FtlabError(f"interpolation barriers need a classification task; {encoder.spec.name!r} is not")
    was_training = module.training
    module.eval()
    correct, total_loss = 0.0, 0.0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = objectives.training_batch(encoder, chunk).to(model_device(module))
            scores = objectives.option_scores(module, batch, encoder.option_ids)
            correct += float((scores.argmax(-1) == batch.gold).sum())
            total_loss += float(torch.nn.functional.cross_entropy(scores, batch.gold, reduction="sum"))
    finally:
        module.train(was_training)
    return {"accuracy": correct / len(examples), "loss": total_loss / len(examples)}


def interpolate_(module: nn.Module, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> None:
    """Set ``module``'s trainable tensors to ``(1 - alpha) a + alpha b`` in place."""
    params = dict(trainable_parameters(module))
    if set(params) != set(a) or set(a) != set(b):
        raise FtlabError("the two runs' trainable tensors do not match the model (another mode, "
                         "LoRA rank or target modules?)")
    with torch.no_grad():
        for name, p in params.items():
            # Computed in float64 so alpha = 0 and 1 give the endpoints bit for bit.
            mixed = (1 - alpha) * a[name].double() + alpha * b[name].double()
            p.copy_(mixed.to(p.dtype))


def saved_train_config(run_dir: str | Path) -> TrainConfig:
    """The training config saved in a run folder."""
    run = RunDir(run_dir)
    return from_dict(TrainConfig, run.read_config(), str(run.config))


def run_weights(run: str | Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The trainable tensors a run kept, i.e. its ``model/`` and test metrics (see
    :meth:`RunDir.kept`): ``best.safetensors`` for a run that kept the best dev step, else its
    final checkpoint (the last one, if written at step ``cfg.steps``)."""
    folder = RunDir(run)
    dev_selection = bool(cfg.eval_every and cfg.data.n_dev)
    if folder.kept(cfg.keep, dev_selection=dev_selection) == "best" and \
            folder.weights_file("best", fallback=False) is not None:
        return folder.final_weights("best", fallback=False)
    if folder.weights_file("last", fallback=False) is not None and folder.checkpoint_step() == cfg.steps:
        return folder.final_weights("last", fallback=False)
    raise FtlabError(f"{run}: no final checkpoint at step {cfg.steps}"
                     f"{' nor best.safetensors' if cfg.keep == 'best' and dev_selection else ''}; "
                     "train it to the end (ftlab seeds run)")


def interpolation_curve(run_a: str | Path, run_b: str | Path, spec: TaskSpec, examples: Sequence[Example],
                        alphas: Sequence[float] = ALPHAS, progress: bool = False) -> dict[str, Any]:
    """Accuracy and loss along the straight line between the kept weights (:func:`run_weights`:
    what each was tested with) of two runs of the same model and mode, and the barriers (see
    :func:`ftlab.seeds.stats.interpolation_barrier`)."""
    cfg = saved_train_config(run_a)
    cfg_b = saved_train_config(run_b)
    if (cfg.model, cfg.mode, cfg.lora, cfg.prefix) != (cfg_b.model, cfg_b.mode, cfg_b.lora, cfg_b.prefix):
        raise FtlabError(f"{run_a} and {run_b} train different models or modes; interpolate runs of one kind")
    a, b = run_weights(run_a, cfg), run_weights(run_b, cfg_b)  # what each run was tested with
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    module = prepare_model(model, cfg.mode, lora=cfg.lora, prefix=cfg.prefix, seed=cfg.seed_of("init"))
    encoder = Encoder(tokenizer, spec, max_length=cfg.data.max_length)
    points = []
    for alpha in tqdm(alphas, desc="interpolate", disable=not progress, unit="alpha"):
        interpolate_(module, a, b, alpha)
        points.append({"alpha": alpha, **accuracy_and_loss(module, encoder, examples, cfg.eval_batch_size)})
    return {"points": points,
            "accuracy_barrier": interpolation_barrier(alphas, [p["accuracy"] for p in points], higher_is_better=True),
            "loss_barrier": interpolation_barrier(alphas, [p["loss"] for p in points], higher_is_better=False)}
