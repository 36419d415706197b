"""Zero-shot and in-context evaluation of any causal LM on any prompt-based task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ftlab import objectives
from ftlab.errors import FtlabError
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec


@dataclass
class EvalResult:
    """Metrics (``accuracy`` and ``loss``, the mean cross-entropy over the option scores; or
    ``f1`` and ``em``; plus ``n``) and per-example predictions (option index or decoded answer),
    in the order of the examples given."""

    metrics: dict[str, float]
    predictions: list = field(default_factory=list)


def model_device(model: nn.Module) -> torch.device:
    """The device the model's (first) parameters live on; batches are moved there."""
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, spec: TaskSpec, examples: Sequence[Example], *,
             demos: Sequence[Example] = (), k_shot: int = 0, seed: int = 0, batch_size: int = 16,
             max_length: int = 512, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Accuracy (classification) or F1/EM (generation, greedy decoding) of ``model``.

    With ``k_shot > 0`` each query is preceded by ``k_shot`` demonstrations drawn from ``demos``.
    Examples are batched by prompt length to minimise padding; the model is put in eval mode
    for the duration and restored afterwards.
    """
    if not examples:
        raise FtlabError(f"task {spec.name!r}: no examples to evaluate")
    encoder = Encoder(tokenizer, spec, max_length=max_length)
    prompts = objectives.build_prompts(spec, examples, demos, k_shot, seed)
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    predictions: list = [None] * len(examples)
    losses: list[float] = [0.0] * len(examples)  # classification only: a smooth metric beside accuracy
    was_training, device = model.training, model_device(model)
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                          unit="batch"):
            idx = order[start:start + batch_size]
            batch_prompts = [prompts[i] for i in idx]
            preds, batch_losses = _predict(model, tokenizer, encoder, [examples[i] for i in idx],
                                           batch_prompts, device)
            for j, i in enumerate(idx):
                predictions[i] = preds[j]
                losses[i] = batch_losses[j] if batch_losses else 0.0
    finally:
        model.train(was_training)
    metrics = task_metrics(spec, examples, predictions)
    if spec.kind == "classification":
        metrics["loss"] = sum(losses) / len(losses)
    return EvalResult(metrics, predictions)


def _predict(model: nn.Module, tokenizer, encoder: Encoder, examples: list[Example],
             prompts: list[str], device: torch.device) -> tuple[list, list[float]]:
    """Predictions of one batch, and (classification) each example's cross-entropy."""
    spec = encoder.spec
    if spec.kind == "classification":
        batch = encoder.classification(examples, prompts).to(device)
        scores = objectives.option_scores(model, batch, encoder.option_ids).float()
        gold = torch.tensor([ex.label for ex in examples], device=scores.device)
        return scores.argmax(-1).tolist(), F.cross_entropy(scores, gold, reduction="none").tolist()
    batch = encoder.generation(prompts, max_new_tokens=spec.max_new_tokens).to(device)
    return objectives.greedy_decode(model, tokenizer, batch, spec.max_new_tokens), []


def task_metrics(spec: TaskSpec, examples: Sequence[Example], predictions: list) -> dict[str, float]:
    """The task's metrics of ``predictions`` (option indices or decoded answers, in the order of
    ``examples``): ``accuracy`` (classification) or SQuAD ``f1`` and ``em`` (generation), and ``n``."""
    n = len(examples)
    if spec.kind == "classification":
        return {"accuracy": sum(p == ex.label for p, ex in zip(predictions, examples)) / n, "n": n}
    f1 = sum(objectives.best_over_answers(objectives.f1_score, p, ex.answers)
             for p, ex in zip(predictions, examples))
    em = sum(objectives.best_over_answers(objectives.exact_match, p, ex.answers)
             for p, ex in zip(predictions, examples))
    return {"f1": f1 / n, "em": em / n, "n": n}
