"""Per-example Jacobians of a batch's outputs w.r.t. LoRA matrices, from one batched forward
and one backward per output, without ``vmap`` (the eNTK's label-word logits, LESS's losses).

A LoRA layer adds ``s * B (A x)`` to a frozen linear map. For one example with token inputs
``x_t``, ``u_t = A x_t`` and output-gradients ``g_t = df/dz_t`` at ``z_t = B u_t``, the gradient
of ``f`` is a sum over that example's tokens (the per-example gradient trick):

    df/dB = sum_t g_t u_t^T,        df/dA = sum_t (B^T g_t) x_t^T.

Forward hooks keep ``x``, ``u`` and ``z`` of every LoRA pair; ``autograd.grad`` of the summed
output w.r.t. all the ``z`` gives every example's ``g`` at once (rows of a batch do not interact),
and two batched matmuls per layer give the per-example gradients. This does the work of
``vmap(jacrev)`` with the same arithmetic (on a 2-core CPU both run at the same speed) but with
the model's own attention (SDPA / flash, where vmap needs eager attention and ready 4-D masks)
and without vmap's batching rules for every op. Only LoRA weights of peft ``Linear`` layers qualify
(:func:`lora_layers` says which); callers send anything else through ``vmap``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ftlab.errors import FtlabError

_LORA_NAME = re.compile(r"(?P<prefix>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight")


@dataclass
class LoraTap:
    """One LoRA pair's modules and the tensors its forward hooks keep."""

    a: nn.Linear
    b: nn.Linear
    a_name: str  # parameter names of A's and B's weights
    b_name: str
    x: Tensor | None = None  # input of A (B, T, d_in)
    u: Tensor | None = None  # input of B (B, T, r)
    z: Tensor | None = None  # output of B (B, T, d_out), before the scaling
    handles: list = field(default_factory=list)


def lora_layers(module: nn.Module, names: list[str]) -> dict[str, LoraTap] | None:
    """The LoRA pairs that own ``names``, by layer prefix, or ``None`` when some name is not a
    plain LoRA weight (then the generic ``vmap(jacrev)`` path must be used)."""
    taps: dict[str, LoraTap] = {}
    for name in names:
        m = _LORA_NAME.fullmatch(name)
        if m is None:
            return None
        prefix, adapter = m["prefix"], m["adapter"]
        if prefix in taps:
            continue
        layer = module.get_submodule(prefix)
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        plain = (isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.bias is None and b.bias is None
                 and not getattr(layer, "use_dora", {}).get(adapter, False))
        if not plain:
            return None
        taps[prefix] = LoraTap(a, b, f"{prefix}.lora_A.{adapter}.weight", f"{prefix}.lora_B.{adapter}.weight")
    return taps


@contextmanager
def _tapped(taps: dict[str, LoraTap]) -> Iterator[None]:
    """Hooks that keep each pair's ``x``, ``u``, ``z``, and ``requires_grad`` on the LoRA
    weights so that every ``z`` is in the graph; all undone on exit."""
    flags = []
    for tap in taps.values():
        def keep_a(_m, inputs, _out, tap=tap):
            if tap.x is not None:  # a second call would overwrite the first call's inputs
                raise FtlabError("a LoRA layer ran twice in one forward (a shared layer?); per-example LoRA "
                                 "gradients by hooks need each LoRA layer to run once per forward")
            tap.x = inputs[0]

        def keep_b(_m, inputs, out, tap=tap):
            tap.u, tap.z = inputs[0], out
        tap.handles = [tap.a.register_forward_hook(keep_a), tap.b.register_forward_hook(keep_b)]
        for p in (tap.a.weight, tap.b.weight):
            flags.append((p, p.requires_grad))
            p.requires_grad_(True)
    try:
        yield
    finally:
        for tap in taps.values():
            for h in tap.handles:
                h.remove()
            tap.handles, tap.x, tap.u, tap.z = [], None, None, None
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_jacobians(taps: dict[str, LoraTap], names: list[str], attention_mask: Tensor,
                   forward: Callable[[], Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example Jacobians ``{name: (B, O, *shape)}`` of the outputs ``(B, O)`` that
    ``forward()`` computes (one batched model call whose row ``i`` depends on example ``i``
    alone), w.r.t. the LoRA weights ``names``, and the outputs themselves.

    Args:
        taps: :func:`lora_layers` of the model for ``names``.
        attention_mask: the batch's ``(B, T)`` padding mask (pad positions contribute zero).
        forward: runs the model on the batch and returns the outputs.
    """
    with torch.enable_grad(), _tapped(taps):
        f = forward()
        order = list(taps.values())
        keep = attention_mask[:, :, None].bool()  # pad positions: zero, even if not finite
        xs = [torch.where(keep, t.x, 0).detach() for t in order]
        us = [torch.where(keep, t.u, 0).detach() for t in order]
        n_out = f.shape[1]
        per_output = [torch.autograd.grad(f[:, o].sum(), [t.z for t in order], retain_graph=o + 1 < n_out)
                      for o in range(n_out)]
        gzs = [torch.stack(g, 2) for g in zip(*per_output)]  # (B, T, O, d_out) per layer
    jac: dict[str, Tensor] = {}
    for tap, x, u, gz in zip(order, xs, us, gzs):
        gz = torch.where(keep[..., None], gz, 0)
        rows, tokens, _, d_out = gz.shape
        # Sums over tokens as batched matmuls with the wide dimension last, then the
        # parameter layout (O, d_out, r) / (O, r, d_in) per example.
        if tap.b_name in names:
            jb = torch.bmm(u.transpose(1, 2), gz.reshape(rows, tokens, n_out * d_out))  # (B, r, O d_out)
            jac[tap.b_name] = jb.view(rows, -1, n_out, d_out).permute(0, 2, 3, 1)
        if tap.a_name in names:
            h = (gz @ tap.b.weight.detach()).reshape(rows, tokens, -1)  # B^T g: (B, T, O r)
            jac[tap.a_name] = torch.bmm(h.transpose(1, 2), x).view(rows, n_out, -1, x.shape[-1])
    return {n: jac[n] for n in names}, f.detach()
