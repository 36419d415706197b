"""The demo recipe: zero-shot accuracy, a short fine-tuning run, accuracy again."""

from __future__ import annotations

import time
from typing import Any

from ftlab.config import TrainConfig
from ftlab.evaluate import evaluate
from ftlab.models import load_model
from ftlab.train import load_run_data, train


def run_demo(cfg: TrainConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate ``cfg.model`` zero-shot on the held-out test split, fine-tune it as ``cfg``
    says, and return one row per method with its test accuracy, size and wall time."""
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    data = load_run_data(cfg)
    start = time.perf_counter()
    zero_shot = evaluate(model, tokenizer, data.spec, data.splits.test, batch_size=cfg.eval_batch_size,
                         max_length=cfg.data.max_length, progress=progress, desc="zero-shot")
    rows = [{"method": "zero-shot", **zero_shot.metrics, "seconds": time.perf_counter() - start}]
    start = time.perf_counter()
    results = train(cfg, progress=progress, model_and_tokenizer=(model, tokenizer), data=data)
    rows.append({"method": f"fine-tuned ({cfg.mode}, {cfg.optimizer}, {cfg.steps} steps)",
                 **results["test"], "seconds": time.perf_counter() - start})
    return rows
