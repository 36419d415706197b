"""The computation TinT performs, in plain PyTorch: one step of (approximate) dynamic evaluation.

Given one sequence split into a *training part* (positions ``< n_train``) and a *test part*:

1. forward the whole sequence through the inner model, keeping each top-layer's activations;
2. backward from the training-part loss (next-token cross-entropy at the positions of
   ``loss_mask``) through the top ``k`` layers only, with TinT's three approximations
   (:class:`Approximations`, each switchable on its own):

   - ``stop_attention_grad``: no gradient through the attention probabilities, only through the
     values (``dV = A^T dO``); query/key weights then get no gradient and rotary positions need
     no backward;
   - ``finite_diff_n = N``: the backward of RMSNorm's normalisation ``n(x) = x / rms(x)`` and of
     the SwiGLU gate ``silu`` by first-order finite differences, ``N (f(x + g/N) - f(x))``
     instead of the Jacobian-vector product ``J_f(x) g`` (both Jacobians are symmetric, so
     ``J^T g = J g``); it converges to the exact backward as ``N`` grows;
   - ``sum_over_tokens``: the loss is the *sum* of the per-token losses (TinT's descent adds up
     ``dy_t x_t^T`` over the training tokens, unnormalised) instead of their mean (dynamic
     evaluation's loss); with the same ``lr`` the step is then ``n_tokens`` times longer;

3. one SGD step ``W <- W - lr * grad`` on the top ``k`` layers' seven linear weights (norm gains,
   embeddings and the LM head stay fixed);
4. the forward of the sequence through the updated top layers (the bottom layers are unchanged,
   so their activations are reused); the result is the logits at the test-part positions (which
   still attend to the training part, as in dynamic evaluation of a context).

:func:`approximate_step` is the hand-written backward; :func:`exact_step` the same step with
autograd (with all approximations off the two agree to rounding); :func:`approximation_costs`
switches the approximations on one at a time and measures what each costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ftlab.errors import FtlabError
from ftlab.tint.inner import (
    LINEAR_NAMES,
    InnerLayer,
    InnerModel,
    LayerCache,
    layer_forward,
    logits_of,
    rms_normalize,
    unrotate,
)


@dataclass(frozen=True)
class Approximations:
    """Which of TinT's approximations the backward pass makes (see the module docstring)."""

    stop_attention_grad: bool = True
    finite_diff_n: float | None = 100.0
    sum_over_tokens: bool = True

    @classmethod
    def none(cls) -> "Approximations":
        """The exact backward (equals autograd)."""
        return cls(False, None, False)


@dataclass
class StepResult:
    """One dynamic-evaluation step: test-part logits after the update, the gradients of the top
    layers' linear weights (bottom layer first), the updated top layers, the training loss."""

    test_logits: Tensor
    grads: list[dict[str, Tensor]]
    layers: list[InnerLayer]
    train_loss: float
    n_loss_tokens: int


def check_split(ids: Tensor, n_train: int, loss_mask: Tensor) -> int:
    """Validate a (training part, test part) split; returns the number of loss tokens."""
    t = ids.shape[0]
    if ids.dim() != 1:
        raise FtlabError(f"TinT takes one sequence of token ids, got shape {tuple(ids.shape)}")
    if n_train < 2:
        raise FtlabError(f"the context has no training part (n_train={n_train}); TinT needs >= 2 "
                         "training tokens to learn from before the test part")
    if n_train >= t:
        raise FtlabError(f"the context has no test part (n_train={n_train} of {t} tokens)")
    if loss_mask.shape != ids.shape or loss_mask.dtype != torch.bool:
        raise FtlabError(f"loss_mask must be a bool tensor of shape {tuple(ids.shape)}")
    if bool(loss_mask[n_train - 1:].any()):
        raise FtlabError("loss_mask marks a position whose next token lies outside the training part "
                         f"(only positions < {n_train - 1} may carry the training loss)")
    count = int(loss_mask.sum())
    if count == 0:
        raise FtlabError("the training part has no loss tokens (loss_mask is all False)")
    return count


def whole_context_mask(ids: Tensor, n_train: int) -> Tensor:
    """Loss on every next-token prediction inside the training part."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[: n_train - 1] = True
    return mask


def loss_gradient(model: InnerModel, h_top: Tensor, ids: Tensor, loss_mask: Tensor, mean: bool
                  ) -> tuple[Tensor, float]:
    """Gradient of the training loss w.r.t. the logits, (T, vocab), zero off the loss positions:
    softmax minus the one-hot next token (it enters the hidden state as ``E (p - q)`` through
    the LM head); and the loss. Only the loss positions go through the LM head."""
    rows = loss_mask.nonzero().squeeze(-1)
    logits = logits_of(model, h_top[rows])
    targets = ids[rows + 1]
    dlogits = torch.softmax(logits, dim=-1)
    dlogits[torch.arange(len(rows)), targets] -= 1.0
    scale = 1.0 / len(rows) if mean else 1.0
    loss = float(F.cross_entropy(logits, targets, reduction="sum")) * scale
    full = h_top.new_zeros(h_top.shape[0], logits.shape[-1])
    full[rows] = dlogits * scale
    return full, loss


def _jvp_rms(x: Tensor, g: Tensor, eps: float, n: float | None) -> Tensor:
    """Backward of ``x / rms(x)`` applied to ``g``: exact, or N (f(x + g/N) - f(x))."""
    if n is not None:
        return n * (rms_normalize(x + g / n, eps) - rms_normalize(x, eps))
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return r * g - x * r.pow(3) * (x * g).mean(-1, keepdim=True)


def _jvp_silu(x: Tensor, g: Tensor, n: float | None) -> Tensor:
    """Backward of ``silu`` applied to ``g``: exact, or N (silu(x + g/N) - silu(x))."""
    if n is not None:
        return n * (F.silu(x + g / n) - F.silu(x))
    s = torch.sigmoid(x)
    return g * s * (1 + x * (1 - s))


def layer_backward(model: InnerModel, layer: InnerLayer, c: LayerCache, dh: Tensor, cos: Tensor, sin: Tensor,
                   approx: Approximations) -> tuple[Tensor, dict[str, Tensor]]:
    """Gradient w.r.t. the layer input and the seven linear weights, given ``dh`` = gradient
    w.r.t. the layer output. Gradients are summed over tokens (``dy^T x``)."""
    spec, w, n = model.spec, layer.w, approx.finite_diff_n
    t, hd = dh.shape[0], spec.head_dim
    grads: dict[str, Tensor] = {}
    # MLP: out = h2 + down(silu(gate(x2)) * up(x2))
    grads["down"] = dh.T @ c.m
    dm = dh @ w["down"]
    du = dm * F.silu(c.g)
    dg = _jvp_silu(c.g, dm * c.u, n)
    grads["gate"], grads["up"] = dg.T @ c.x2, du.T @ c.x2
    dx2 = dg @ w["gate"] + du @ w["up"]
    dh2 = dh + _jvp_rms(c.h2, layer.ln2 * dx2, spec.eps, n)
    # attention: h2 = h + o_proj(A V)
    grads["o"] = dh2.T @ c.o
    do = (dh2 @ w["o"]).view(t, spec.n_heads, hd).transpose(0, 1)            # (H, T, hd)
    dvv = c.a.transpose(-1, -2) @ do                                          # stop-gradient part: A^T dO
    dv = dvv.view(spec.n_kv_heads, spec.group, t, hd).sum(1)
    dv_flat = dv.transpose(0, 1).reshape(t, -1)
    grads["v"] = dv_flat.T @ c.x1
    dx1 = dv_flat @ w["v"]
    if approx.stop_attention_grad:
        grads["q"], grads["k"] = torch.zeros_like(w["q"]), torch.zeros_like(w["k"])
    else:
        vv = c.v.repeat_interleave(spec.group, 0)
        kk = c.k.repeat_interleave(spec.group, 0)
        da = do @ vv.transpose(-1, -2)
        ds = c.a * (da - (c.a * da).sum(-1, keepdim=True)) / hd ** 0.5
        dq = unrotate(ds @ kk, cos, sin).transpose(0, 1).reshape(t, -1)
        dk = (ds.transpose(-1, -2) @ c.q).view(spec.n_kv_heads, spec.group, t, hd).sum(1)
        dk = unrotate(dk, cos, sin).transpose(0, 1).reshape(t, -1)
        grads["q"], grads["k"] = dq.T @ c.x1, dk.T @ c.x1
        dx1 = dx1 + dq @ w["q"] + dk @ w["k"]
    return dh2 + _jvp_rms(c.h, layer.ln1 * dx1, spec.eps, n), grads


def sgd(layers: list[InnerLayer], grads: list[dict[str, Tensor]], lr: float) -> list[InnerLayer]:
    """The layers with ``W - lr * grad`` for every linear weight."""
    return [layer.with_weights({k: layer.w[k] - lr * g[k] for k in LINEAR_NAMES})
            for layer, g in zip(layers, grads)]


def _check_k(model: InnerModel, k: int) -> None:
    if not 1 <= k <= model.spec.n_layers:
        raise FtlabError(f"simulated layers k={k} must lie in 1..{model.spec.n_layers} (the inner model's depth)")


def _bottom(model: InnerModel, ids: Tensor, k: int, h0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Input hidden state of the first trained layer (bottom layers run once), and rotary tables."""
    cos, sin = model.rotary(torch.arange(ids.shape[0], device=ids.device), model.embed.dtype)
    if h0 is not None:
        return h0, cos, sin
    h = model.embed[ids]
    for layer in model.layers[: model.spec.n_layers - k]:
        h, _ = layer_forward(model.spec, layer, h, cos, sin)
    return h, cos, sin


def _top_forward(model: InnerModel, layers: list[InnerLayer], h: Tensor, cos: Tensor, sin: Tensor,
                 stop_scores: bool = False) -> tuple[Tensor, list[LayerCache]]:
    caches = []
    for layer in layers:
        h, c = layer_forward(model.spec, layer, h, cos, sin, stop_scores)
        caches.append(c)
    return h, caches


def approximate_step(model: InnerModel, ids: Tensor, n_train: int, loss_mask: Tensor, k: int, lr: float,
                     approx: Approximations = Approximations(), h0: Tensor | None = None,
                     last_only: bool = False) -> StepResult:
    """One step of TinT's approximate dynamic evaluation (hand-written backward). ``h0``: the
    input of the first trained layer, if already computed (the bottom layers are then skipped);
    ``last_only``: logits of the last position only (classification reads nothing else)."""
    count = check_split(ids, n_train, loss_mask)
    _check_k(model, k)
    with torch.no_grad():
        h0, cos, sin = _bottom(model, ids, k, h0)
        top = model.layers[model.spec.n_layers - k:]
        h, caches = _top_forward(model, top, h0, cos, sin)
        dlogits, loss = loss_gradient(model, h, ids, loss_mask, mean=not approx.sum_over_tokens)
        dh = _jvp_rms(h, model.norm * (dlogits @ model.lm_head), model.spec.eps, approx.finite_diff_n)
        grads: list[dict[str, Tensor]] = []
        for layer, c in zip(reversed(top), reversed(caches)):
            dh, g = layer_backward(model, layer, c, dh, cos, sin, approx)
            grads.insert(0, g)
        new = sgd(top, grads, lr)
        h_new, _ = _top_forward(model, new, h0, cos, sin)
        logits = logits_of(model, h_new[-1:] if last_only else h_new[n_train:])
    return StepResult(logits, grads, new, loss, count)


def exact_step(model: InnerModel, ids: Tensor, n_train: int, loss_mask: Tensor, k: int, lr: float, *,
               sum_over_tokens: bool = False, stop_attention_grad: bool = False,
               h0: Tensor | None = None, last_only: bool = False) -> StepResult:
    """The same step with autograd: exact dynamic evaluation (mean loss, full backward) by
    default; ``stop_attention_grad`` detaches the attention probabilities in the forward."""
    count = check_split(ids, n_train, loss_mask)
    _check_k(model, k)
    with torch.no_grad():
        h0, cos, sin = _bottom(model, ids, k, h0)
    top = model.layers[model.spec.n_layers - k:]
    params = [{name: layer.w[name].detach().clone().requires_grad_(True) for name in LINEAR_NAMES} for layer in top]
    with torch.enable_grad():
        h, _ = _top_forward(model, [layer.with_weights(p) for layer, p in zip(top, params)], h0, cos, sin,
                            stop_attention_grad)
        rows = loss_mask.nonzero().squeeze(-1)
        loss = F.cross_entropy(logits_of(model, h[rows]), ids[rows + 1], reduction="sum" if sum_over_tokens else "mean")
        flat = [p[name] for p in params for name in LINEAR_NAMES]
        got = torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True)
    grads = [dict(zip(LINEAR_NAMES, got[i * 7:(i + 1) * 7])) for i in range(len(top))]
    new = sgd(top, grads, lr)
    with torch.no_grad():
        h_new, _ = _top_forward(model, new, h0, cos, sin)
        test_logits = logits_of(model, h_new[-1:] if last_only else h_new[n_train:])
    return StepResult(test_logits, grads, new, float(loss.detach()), count)


def test_part_loss(ids: Tensor, n_train: int, test_logits: Tensor) -> float:
    """Mean next-token cross-entropy over the test part (predictions of tokens n_train+1..T-1)."""
    targets = ids[n_train + 1:]
    if not len(targets):
        return float("nan")
    return float(F.cross_entropy(test_logits[:-1].double(), targets))


def _flat(grads: list[dict[str, Tensor]]) -> Tensor:
    return torch.cat([g[name].reshape(-1) for g in grads for name in LINEAR_NAMES]).double()


def approximation_costs(model: InnerModel, ids: Tensor, n_train: int, loss_mask: Tensor, k: int, lr: float,
                        finite_diff_n: float = 100.0) -> dict[str, dict[str, float]]:
    """What each approximation costs on one sequence, switched on alone, then all together.

    For each setting: the relative error and cosine of the weight update (``lr * grad``)
    against exact dynamic evaluation, the largest change of the test-part logits, and the
    test-part loss after the step (with ``base``: before any step, and ``exact``)."""
    exact = exact_step(model, ids, n_train, loss_mask, k, lr)
    with torch.no_grad():
        base_logits, _ = forward_logits(model, ids)
    ref = _flat(exact.grads)
    settings = {
        "stop_attention_grad": Approximations(True, None, False),
        "finite_diff": Approximations(False, finite_diff_n, False),
        "sum_over_tokens": Approximations(False, None, True),
        "all (TinT)": Approximations(True, finite_diff_n, True),
    }
    out = {"base": {"test_loss": test_part_loss(ids, n_train, base_logits[n_train:])},
           "exact": {"test_loss": test_part_loss(ids, n_train, exact.test_logits), "update_rel_error": 0.0,
                     "update_cosine": 1.0, "max_logit_change": 0.0}}
    for name, approx in settings.items():
        step = approximate_step(model, ids, n_train, loss_mask, k, lr, approx)
        mine = _flat(step.grads)
        out[name] = {
            "test_loss": test_part_loss(ids, n_train, step.test_logits),
            "update_rel_error": float((mine - ref).norm() / ref.norm().clamp_min(1e-300)),
            "update_cosine": float(F.cosine_similarity(mine, ref, dim=0)),
            "max_logit_change": float((step.test_logits - exact.test_logits).abs().max()),
        }
    return out


def forward_logits(model: InnerModel, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of the unchanged model on ``ids`` (and the input of the last layer)."""
    from ftlab.tint.inner import forward
    logits, inputs = forward(model, ids)
    return logits, inputs[-1]


__all__ = ["Approximations", "StepResult", "approximate_step", "exact_step", "approximation_costs",
           "check_split", "whole_context_mask", "test_part_loss", "layer_backward", "sgd"]
