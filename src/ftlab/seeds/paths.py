"""Evaluating many points of weight space on fixed example sets, fast: the engine behind the
pairwise barrier matrix, the 2-D loss surface and the curvature measures.

A point is a dict of the *trainable* tensors of one module (the frozen base model is shared by
every run of a study: LoRA adapters, a prefix, or all weights). :class:`PointEvaluator` loads the
model once, tokenises each example set once into fixed batches (shared by every point), and
returns per-example losses and correctness. For LoRA (every trainable tensor is the weight of a
bias-free ``nn.Linear``) it evaluates ``K`` points in one forward: the batch is repeated ``K``
times and a forward hook on each adapter matrix applies the ``k``-th point's weights to the
``k``-th copy, so the frozen model's matmuls run on ``K x B`` rows at once. Other modes evaluate
one point after the other.

Layers below the first one holding a trainable tensor are the same for every point (LoRA on the
top layers, as in the seed studies): their output for each fixed batch is computed once and cached,
and every later forward skips them (``cache_bottom``; measured in benchmarks/seed_paths_speed.py).

Straight-line paths reuse their endpoints: ``theta(0)`` and ``theta(1)`` are the runs
themselves, evaluated once per run (:meth:`PointEvaluator.evaluate`), so a path costs only its
interior alphas.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftlab import objectives
from ftlab.distributed import blocks_of
from ftlab.errors import FtlabError
from ftlab.evaluate import model_device
from ftlab.models import trainable_parameters
from ftlab.objectives import Encoder, ModelBatch
from ftlab.tasks import Example, TaskSpec

Point = Mapping[str, torch.Tensor]


@dataclass
class SetResult:
    """Per-example cross-entropy over the option scores and 1/0 correctness of one point."""

    loss: np.ndarray  # (n,) float64
    correct: np.ndarray  # (n,) float64

    def mean(self) -> dict[str, float]:
        return {"loss": float(self.loss.mean()), "accuracy": float(self.correct.mean())}


def mix(a: Point, b: Point, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) a + alpha b``, computed in float64 so alpha = 0 and 1 give the endpoints bit for bit."""
    return {n: ((1 - alpha) * a[n].double() + alpha * b[n].double()).to(a[n].dtype) for n in a}


def combine(origin: Point, directions: Sequence[Point], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """``origin + sum_i c_i d_i`` in float64 (a point of the plane through three runs)."""
    out = {}
    for n, t in origin.items():
        acc = t.double().clone()
        for d, c in zip(directions, coefficients):
            acc += c * d[n].double()
        out[n] = acc.to(t.dtype)
    return out


class PointEvaluator:
    """Per-example loss/correctness of points (trainable-tensor dicts) of ``module`` on named
    example sets, each tokenised once. ``group``: points per forward (LoRA only; 1: one by one)."""

    def __init__(self, module: nn.Module, tokenizer, spec: TaskSpec, sets: Mapping[str, Sequence[Example]], *,
                 batch_size: int = 16, max_length: int = 256, group: int = 4, cache_bottom: bool = True) -> None:
        if spec.kind != "classification":
            raise FtlabError(f"loss surfaces need a classification task; {spec.name!r} is not")
        self.module = module.eval()
        self.params = dict(trainable_parameters(module))
        self.encoder = Encoder(tokenizer, spec, max_length=max_length)
        device = model_device(module)
        self.batches: dict[str, list[ModelBatch]] = {}
        self.orders: dict[str, list[list[int]]] = {}  # the set's example indices of each batch
        for name, examples in sets.items():
            if not examples:
                raise FtlabError(f"example set {name!r} is empty")
            # Sorted by length: less padding; results are put back in the set's order.
            order = sorted(range(len(examples)), key=lambda i: -len(spec.prompt(examples[i])))
            chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
            self.batches[name] = [objectives.training_batch(self.encoder, [examples[i] for i in c]).to(device)
                                  for c in chunks]
            self.orders[name] = chunks
        self.sizes = {name: len(examples) for name, examples in sets.items()}
        self.linears = _lora_linears(module, self.params)
        self.group = group if self.linears is not None else 1
        self.bottom = _FrozenBottom.find(module, self.params) if cache_bottom else None
        if self.bottom is not None:
            self.bottom_cache = {name: [self.bottom.capture(module, b) for b in batches]
                                 for name, batches in self.batches.items()}

    def check_point(self, point: Point, where: str) -> None:
        """Raise unless ``point`` holds exactly this module's trainable tensors, with their shapes."""
        if set(point) != set(self.params):
            missing, extra = sorted(set(self.params) - set(point)), sorted(set(point) - set(self.params))
            raise FtlabError(f"{where}: its trainable tensors do not match the model's (missing {missing[:2]}, "
                             f"unexpected {extra[:2]}): another mode, LoRA rank or target modules?")
        for n, p in self.params.items():
            if tuple(point[n].shape) != tuple(p.shape):
                raise FtlabError(f"{where}: tensor {n} has shape {tuple(point[n].shape)}, the model's is "
                                 f"{tuple(p.shape)}: another LoRA rank or model?")

    def load(self, point: Point) -> None:
        """Copy ``point`` into the module's trainable tensors."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(point[n].to(p.device, p.dtype))

    @torch.no_grad()
    def evaluate(self, point: Point, set_name: str) -> SetResult:
        """Per-example results of one point on one set."""
        return self.evaluate_many([point], set_name)[0]

    @torch.no_grad()
    def evaluate_many(self, points: Sequence[Point], set_name: str) -> list[SetResult]:
        """Per-example results of every point on one set, ``self.group`` points per forward."""
        out: list[SetResult] = []
        for start in range(0, len(points), self.group):
            out.extend(self._evaluate_group(points[start:start + self.group], set_name))
        return out

    def _evaluate_group(self, points: Sequence[Point], set_name: str) -> list[SetResult]:
        k, n = len(points), self.sizes[set_name]
        losses, correct = np.zeros((k, n)), np.zeros((k, n))
        chunks = self.orders[set_name]
        skipping = self.bottom.skipped() if self.bottom is not None else contextlib.nullcontext()
        with self._grouped(points), skipping:
            for j, (batch, idx) in enumerate(zip(self.batches[set_name], chunks)):
                if self.bottom is not None:
                    self.bottom.hidden = self.bottom_cache[set_name][j].repeat(k, 1, 1)
                scores = objectives.option_scores(self.module, _repeat(batch, k) if k > 1 else batch,
                                                  self.encoder.option_ids).float()
                gold = batch.gold.repeat(k)
                loss = F.cross_entropy(scores, gold, reduction="none").view(k, -1)
                hit = (scores.argmax(-1) == gold).view(k, -1)
                losses[:, idx] = loss.double().cpu().numpy()
                correct[:, idx] = hit.double().cpu().numpy()
        return [SetResult(losses[i], correct[i]) for i in range(k)]

    @contextlib.contextmanager
    def _grouped(self, points: Sequence[Point]) -> Iterator[None]:
        """Load one point, or (LoRA, several points) hook every adapter matrix to apply point k's
        weights to the k-th copy of the batch."""
        if len(points) == 1:
            self.load(points[0])
            yield
            return
        device = model_device(self.module)
        handles = []
        for name, linear in self.linears.items():
            stacked = torch.stack([p[name] for p in points]).to(device, linear.weight.dtype)  # (K, out, in)
            handles.append(linear.register_forward_hook(_group_hook(stacked)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _group_hook(stacked: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        k = stacked.shape[0]
        xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        # Row block k of the batch goes through point k's matrix (the module's own output is discarded).
        y = torch.einsum("kb...i,koi->kb...o", xs.to(stacked.dtype), stacked)
        return y.reshape(*x.shape[:-1], stacked.shape[1]).to(output.dtype)
    return hook


class _Stop(Exception):
    pass


class _Passthrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states (as a 1-tuple for
    the transformers versions whose layers return tuples)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class _FrozenBottom:
    """The decoder layers below ``first`` (the lowest layer holding a trainable tensor): their
    output is captured once per batch, and while :meth:`skipped` they are replaced by
    passthroughs and a pre-hook on layer ``first`` substitutes the captured hidden states."""

    def __init__(self, layers: nn.ModuleList, first: int) -> None:
        self.layers, self.first = layers, first
        self.as_tuple = False  # whether the layers return tuples (older transformers): set by capture()
        self.hidden: torch.Tensor | None = None

    @classmethod
    def find(cls, module: nn.Module, params: Mapping[str, nn.Parameter]) -> "_FrozenBottom | None":
        """The stack's frozen bottom (the blocks are :func:`ftlab.distributed.blocks_of`), or None
        when there is nothing to skip (no blocks, a trainable tensor outside them, e.g. a prefix or
        the embeddings, or one in the first block)."""
        try:
            layers = blocks_of(module)
        except FtlabError:
            return None
        list_name = next(n for n, m in module.named_modules() if m is layers)
        index = []
        for name in params:
            head, _, rest = name.partition(list_name + ".")
            if head or not rest:
                return None  # a trainable tensor outside the stack
            index.append(int(rest.split(".")[0]))
        first = min(index)
        return cls(layers, first) if first > 0 else None

    def capture(self, module: nn.Module, batch: ModelBatch) -> torch.Tensor:
        """The hidden states entering layer ``first`` for ``batch`` (the forward stops there)."""
        got: list[torch.Tensor] = []

        def grab(_m, args, kwargs):
            got.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            raise _Stop

        def kind(_m, _args, output):
            self.as_tuple = isinstance(output, tuple)

        handles = [self.layers[self.first].register_forward_pre_hook(grab, with_kwargs=True),
                   self.layers[0].register_forward_hook(kind)]
        try:
            with torch.no_grad(), contextlib.suppress(_Stop):
                objectives.option_scores(module, batch, [])
        finally:
            for h in handles:
                h.remove()
        return got[0]

    @contextlib.contextmanager
    def skipped(self) -> Iterator[None]:
        def feed(_m, args, kwargs):
            if args:
                return (self.hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.hidden}

        originals = [self.layers[i] for i in range(self.first)]
        for i in range(self.first):
            self.layers[i] = _Passthrough(self.as_tuple)
        handle = self.layers[self.first].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(originals):
                self.layers[i] = layer


def _lora_linears(module: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, nn.Linear] | None:
    """Parameter name -> its ``nn.Linear`` when every trainable tensor is the weight of a
    bias-free linear layer (LoRA's A and B), else None (points are then evaluated one by one)."""
    owners = {}
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is None:
            for p_name, _param in mod.named_parameters(recurse=False):
                owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    if not params or any(n not in owners for n in params):
        return None
    return {n: owners[n] for n in params}


def _repeat(batch: ModelBatch, k: int) -> ModelBatch:
    rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
    return ModelBatch(rep(batch.input_ids), rep(batch.attention_mask), rep(batch.position_ids),
                      rep(batch.labels), batch.n_options, rep(batch.gold))


def path_results(evaluator: PointEvaluator, a: Point, b: Point, alphas: Sequence[float], set_name: str,
                 ends: tuple[SetResult, SetResult] | None = None) -> list[SetResult]:
    """Per-example results at every alpha of the straight line from ``a`` to ``b``; the
    endpoints come from ``ends`` (each run's own evaluation) when given."""
    interior = [x for x in alphas if x not in (0.0, 1.0)]
    results = dict(zip(interior, evaluator.evaluate_many([mix(a, b, x) for x in interior], set_name)))
    if ends is None:
        ends = tuple(evaluator.evaluate_many([a, b], set_name))  # type: ignore[assignment]
    results[0.0], results[1.0] = ends
    return [results[x] for x in alphas]
