"""The construction: a TinT module built from an inner model's weights, whose one forward pass
over (prefix tokens, training part, test part) returns the test part's logits after one step of
approximate dynamic evaluation (:func:`ftlab.tint.reference.approximate_step`).

Where things live
-----------------
- **Prefix tokens** hold the inner linear weights. A weight ``W`` (``dout x din``) is sharded
  row-wise over ``P = n_prefixes`` prefix tokens: prefix ``j`` holds rows ``j*r .. j*r+r-1``
  (``r = dout / P``) flattened into its embedding, so the TinT hidden size must be at least
  ``r * din`` (inner hidden x rows per prefix). Each linear weight has its own *bank* of ``P``
  prefix tokens (the sequence holds ``banks x P`` prefix tokens); a bank starts as a TinT
  parameter (the pretrained weight) and the descent modules rewrite it inside the pass.
- **Input tokens** (training part, then test part) carry the inner hidden state and, in named
  *memory slots* of their embedding, the activations the backward and descent modules need
  (``ftlab.tint`` keeps the slots as a dict of column blocks of the token embedding).

How a linear layer is simulated (linear attention, no softmax)
--------------------------------------------------------------
- forward ``y = W x``: ``r`` heads; token ``t`` queries with ``x_t``, prefix ``j`` answers with key
  ``W[j*r+h]`` (head ``h``) and value ``e_j`` (its one-hot prefix id), so head ``h`` of token ``t``
  reads ``(<x_t, W[j*r+h]>)_j``; a fixed permutation orders them into ``y_t``;
- backward ``dx = W^T dy``: token ``t`` queries with ``dy_t`` (reordered per head), prefix ``j``
  answers with key ``e_j`` and value ``W[j*r+h]``; summing the heads gives ``W^T dy_t``;
- descent ``W <- W - lr sum_t dy_t x_t^T``: prefix ``j`` queries with ``e_j``, training tokens answer
  with key ``dy_t`` (reordered) and value ``x_t``; test tokens are masked out; the output, times
  ``-lr``, is added to the prefix embedding (a gated residual that only prefix tokens take).

Everything else is token-wise or attention among input tokens: RMSNorm and SwiGLU forward,
their finite-difference backward ``N (f(x + g/N) - f(x))``, the inner softmax attention with
rotary positions (TinT heads with the same rotary tables), its stop-gradient backward
``dV = A^T dO`` (attention to the *future* with the recomputed, transposed probabilities), and
the loss gradient ``E (p - q)`` (the next token's output embedding reaches position ``t`` by an
attention that looks one position ahead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ftlab.config import Settings, above, at_least, setting
from ftlab.errors import FtlabError
from ftlab.tint.inner import InnerModel, rms_normalize, rotate
from ftlab.tint.reference import check_split


@dataclass
class TintConfig(Settings):
    """How a TinT is built: ``n_prefixes`` prefix tokens per weight bank, ``k`` simulated
    (trained) top layers, the inner SGD learning rate, the finite-difference ``N``, and the TinT
    hidden size (``None``: the smallest the prefix layout needs)."""

    where = "tint"

    n_prefixes: int = setting(64, check=at_least(1))
    k: int = setting(1, check=at_least(1))
    inner_lr: float = setting(1e-3, check=at_least(0))
    finite_diff_n: float = setting(100.0, check=above(0))
    hidden_size: int | None = None


@dataclass
class TintState:
    """The sequence inside TinT: prefix-token banks (name -> (P, H)) and the input tokens'
    embedding as named column blocks (slot -> (T, width))."""

    prefix: dict[str, Tensor]
    stream: dict[str, Tensor]
    n_train: int


def prefix_layout(inner: InnerModel, cfg: TintConfig) -> tuple[int, dict[str, int]]:
    """The TinT hidden size and the rows per prefix of every weight; raises when the inner
    sizes do not split over the prefixes or the hidden size cannot hold a prefix's rows."""
    rows, need = {}, 0
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        dout, din = inner.spec.shape(name)
        if dout % cfg.n_prefixes:
            raise FtlabError(f"tint.n_prefixes={cfg.n_prefixes} does not divide the {dout} rows of the inner "
                             f"{name} weight; pick a common divisor of "
                             f"{sorted({inner.spec.shape(n)[0] for n in ('q', 'k', 'o', 'gate')})}")
        rows[name] = dout // cfg.n_prefixes
        need = max(need, rows[name] * din)
    if cfg.hidden_size is not None and cfg.hidden_size < need:
        worst = max(rows, key=lambda n: rows[n] * inner.spec.shape(n)[1])
        raise FtlabError(f"tint.hidden_size={cfg.hidden_size} cannot hold the prefix layout: a prefix token of the "
                         f"{worst} weight stores {rows[worst]} rows of {inner.spec.shape(worst)[1]} = {need} numbers; "
                         f"use hidden_size >= {need} or more prefixes")
    return (cfg.hidden_size or need), rows


def _one_hot(p: int, heads: int, like: Tensor) -> Tensor:
    """(P, heads, P): prefix j's identifier e_j, repeated for every head."""
    return torch.eye(p, dtype=like.dtype, device=like.device)[:, None, :].expand(p, heads, p)


# ------------------------------------------------------------------------------ linear modules

class LinearForward(nn.Module):
    """``stream[dst] = W stream[src]``, W read from prefix bank ``bank`` by linear attention."""

    def __init__(self, bank: str, dout: int, din: int, p: int, src: str, dst: str) -> None:
        super().__init__()
        self.bank, self.dout, self.din, self.p, self.src, self.dst = bank, dout, din, p, src, dst
        self.r = dout // p

    def forward(self, s: TintState) -> TintState:
        x, pre = s.stream[self.src], s.prefix[self.bank]
        q = x[:, None, :].expand(-1, self.r, -1)                        # (T, r, din): x repeated per head
        k = pre[:, : self.r * self.din].reshape(self.p, self.r, self.din)  # (P, r, din): weight rows
        v = _one_hot(self.p, self.r, x)                                 # (P, r, P): prefix ids
        scores = torch.einsum("thd,jhd->thj", q, k)                    # linear attention: no softmax
        out = torch.einsum("thj,jhp->thp", scores, v)                   # (T, r, P)
        s.stream[self.dst] = out.transpose(1, 2).reshape(x.shape[0], self.dout)  # row j*r+h
        return s


class LinearBackward(nn.Module):
    """``stream[dst] (+)= W^T stream[grad]``: tokens query with dy, prefixes return weight rows."""

    def __init__(self, bank: str, dout: int, din: int, p: int, grad: str, dst: str, add: bool = False) -> None:
        super().__init__()
        self.bank, self.dout, self.din, self.p, self.grad, self.dst, self.add = bank, dout, din, p, grad, dst, add
        self.r = dout // p

    def forward(self, s: TintState) -> TintState:
        dy, pre = s.stream[self.grad], s.prefix[self.bank]
        q = dy.view(-1, self.p, self.r).transpose(1, 2)                 # (T, r, P): dy[j*r+h] at [h, j]
        k = _one_hot(self.p, self.r, dy)                                # (P, r, P)
        v = pre[:, : self.r * self.din].reshape(self.p, self.r, self.din)
        scores = torch.einsum("thp,jhp->thj", q, k)
        out = torch.einsum("thj,jhd->thd", scores, v).sum(1)           # heads summed by the projection
        s.stream[self.dst] = s.stream[self.dst] + out if self.add else out
        return s


class LinearDescent(nn.Module):
    """``W <- W - lr sum_{t in training part} dy_t x_t^T`` on prefix bank ``bank``: prefixes
    attend to the training tokens (key dy, value x)."""

    def __init__(self, bank: str, dout: int, din: int, p: int, grad: str, src: str, lr: float) -> None:
        super().__init__()
        self.bank, self.dout, self.din, self.p, self.grad, self.src, self.lr = bank, dout, din, p, grad, src, lr
        self.r = dout // p

    def forward(self, s: TintState) -> TintState:
        dy, x, pre = s.stream[self.grad], s.stream[self.src], s.prefix[self.bank]
        q = _one_hot(self.p, self.r, dy)                                # (P, r, P): prefix ids
        k = dy.view(-1, self.p, self.r).transpose(1, 2)                 # (T, r, P)
        keep = torch.arange(dy.shape[0], device=dy.device) < s.n_train  # test tokens are masked out
        scores = torch.einsum("jhp,thp->jht", q, k) * keep
        out = torch.einsum("jht,td->jhd", scores, x).reshape(self.p, self.r * self.din)
        delta = torch.zeros_like(pre)
        delta[:, : self.r * self.din] = -self.lr * out
        s.prefix[self.bank] = pre + delta                               # residual, taken by prefix tokens only
        return s


# ----------------------------------------------------------------------- token-wise modules

class RMSNormForward(nn.Module):
    """``stream[norm] = src / rms(src)`` (kept for the backward) and ``stream[dst] = gain * norm``."""

    def __init__(self, src: str, norm: str, dst: str, gain: Tensor, eps: float) -> None:
        super().__init__()
        self.src, self.norm, self.dst, self.eps = src, norm, dst, eps
        self.register_buffer("gain", gain.detach().clone())

    def forward(self, s: TintState) -> TintState:
        n = rms_normalize(s.stream[self.src], self.eps)
        s.stream[self.norm], s.stream[self.dst] = n, self.gain * n
        return s


class RMSNormBackward(nn.Module):
    """``stream[dst] += N (n(x + gain*g/N) - n(x))``: the first-order finite difference."""

    def __init__(self, x: str, grad: str, dst: str, gain: Tensor, eps: float, n: float) -> None:
        super().__init__()
        self.x, self.grad, self.dst, self.eps, self.n = x, grad, dst, eps, n
        self.register_buffer("gain", gain.detach().clone())

    def forward(self, s: TintState) -> TintState:
        x, g = s.stream[self.x], self.gain * s.stream[self.grad]
        fd = self.n * (rms_normalize(x + g / self.n, self.eps) - rms_normalize(x, self.eps))
        s.stream[self.dst] = s.stream[self.dst] + fd
        return s


class SwiGLUForward(nn.Module):
    def __init__(self, g: str, u: str, dst: str) -> None:
        super().__init__()
        self.g, self.u, self.dst = g, u, dst

    def forward(self, s: TintState) -> TintState:
        s.stream[self.dst] = F.silu(s.stream[self.g]) * s.stream[self.u]
        return s


class SwiGLUBackward(nn.Module):
    """``du = dm * silu(g)``; ``dg = N (silu(g + dm*u/N) - silu(g))``."""

    def __init__(self, g: str, u: str, grad: str, dg: str, du: str, n: float) -> None:
        super().__init__()
        self.g, self.u, self.grad, self.dg, self.du, self.n = g, u, grad, dg, du, n

    def forward(self, s: TintState) -> TintState:
        g, u, dm = s.stream[self.g], s.stream[self.u], s.stream[self.grad]
        s.stream[self.du] = dm * F.silu(g)
        s.stream[self.dg] = self.n * (F.silu(g + dm * u / self.n) - F.silu(g))
        return s


class Residual(nn.Module):
    """``stream[dst] = stream[a] + stream[b]``."""

    def __init__(self, a: str, b: str, dst: str) -> None:
        super().__init__()
        self.a, self.b, self.dst = a, b, dst

    def forward(self, s: TintState) -> TintState:
        s.stream[self.dst] = s.stream[self.a] + s.stream[self.b]
        return s


# ------------------------------------------------------------------------- attention modules

class SelfAttentionForward(nn.Module):
    """The inner causal softmax attention among input tokens, as TinT heads with rotary positions:
    keeps the rotated queries and keys in memory for the backward."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, q: str, k: str, v: str, dst: str,
                 mem: str, inner: InnerModel) -> None:
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv_heads, head_dim
        self.q, self.k, self.v, self.dst, self.mem = q, k, v, dst, mem
        self.register_buffer("inv_freq", inner.inv_freq.clone())

    def tables(self, t: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = torch.arange(t, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, s: TintState) -> TintState:
        t = s.stream[self.q].shape[0]
        cos, sin = self.tables(t, s.stream[self.q].dtype)
        q = rotate(s.stream[self.q].view(t, self.heads, self.hd).transpose(0, 1), cos, sin)
        k = rotate(s.stream[self.k].view(t, self.kv, self.hd).transpose(0, 1), cos, sin)
        v = s.stream[self.v].view(t, self.kv, self.hd).transpose(0, 1)
        group = self.heads // self.kv
        a = _causal_softmax(q, k.repeat_interleave(group, 0))
        s.stream[self.dst] = (a @ v.repeat_interleave(group, 0)).transpose(0, 1).reshape(t, -1)
        s.stream[self.mem + ".qr"] = q.transpose(0, 1).reshape(t, -1)
        s.stream[self.mem + ".kr"] = k.transpose(0, 1).reshape(t, -1)
        return s


def _causal_softmax(q: Tensor, k: Tensor) -> Tensor:
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


class SelfAttentionBackward(nn.Module):
    """Stop-gradient backward: ``dV_s = sum_{t >= s} a_ts dO_t`` (token s attends to the future
    with the recomputed, transposed probabilities); key/value heads sum their query group."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, mem: str, grad: str, dst: str) -> None:
        super().__init__()
        self.heads, self.kv, self.hd, self.mem, self.grad, self.dst = heads, kv_heads, head_dim, mem, grad, dst

    def forward(self, s: TintState) -> TintState:
        t = s.stream[self.grad].shape[0]
        group = self.heads // self.kv
        q = s.stream[self.mem + ".qr"].view(t, self.heads, self.hd).transpose(0, 1)
        k = s.stream[self.mem + ".kr"].view(t, self.kv, self.hd).transpose(0, 1)
        a = _causal_softmax(q, k.repeat_interleave(group, 0))
        do = s.stream[self.grad].view(t, self.heads, self.hd).transpose(0, 1)
        dv = (a.transpose(-1, -2) @ do).view(self.kv, group, t, self.hd).sum(1)
        s.stream[self.dst] = dv.transpose(0, 1).reshape(t, -1)
        return s


class LossGradient(nn.Module):
    """Gradient of the summed next-token loss w.r.t. the final hidden state:
    ``J_norm^T (gain * (softmax(logits) @ E - E[next token]))`` at loss positions (finite
    difference for the norm). The next token's output embedding reaches position t through an
    attention that looks exactly one position ahead."""

    def __init__(self, inner: InnerModel, src: str, dst: str, n: float) -> None:
        super().__init__()
        self.src, self.dst, self.n, self.eps = src, dst, n, inner.spec.eps
        self.register_buffer("gain", inner.norm.detach().clone())
        self.register_buffer("lm_head", inner.lm_head.detach().clone())

    def forward(self, s: TintState, loss_mask: Tensor) -> TintState:
        h = s.stream[self.src]
        t = h.shape[0]
        logits = (self.gain * rms_normalize(h, self.eps)) @ self.lm_head.T
        expected = torch.softmax(logits, dim=-1) @ self.lm_head               # p @ E
        ahead = torch.eye(t, dtype=h.dtype, device=h.device).roll(1, dims=1)  # attention one position ahead
        target = ahead @ s.stream["target_embedding"]                         # E[next token]
        g = (expected - target) * loss_mask.to(h.dtype)[:, None]
        gn = self.gain * g
        s.stream[self.dst] = self.n * (rms_normalize(h + gn / self.n, self.eps) - rms_normalize(h, self.eps))
        return s


# ------------------------------------------------------------------------------- the TinT

class Tint(nn.Module):
    """A TinT built from ``inner``'s weights. ``forward(ids, n_train, loss_mask)`` runs, in one
    pass: the inner forward of all layers on the whole sequence, the approximate backward of
    the top ``k`` layers from the training-part loss, one SGD step on their prefix-held weights,
    and the forward of the updated top layers; it returns the test part's logits."""

    def __init__(self, inner: InnerModel, cfg: TintConfig) -> None:
        super().__init__()
        spec = inner.spec
        if cfg.k > spec.n_layers:
            raise FtlabError(f"tint.k={cfg.k} exceeds the inner model's {spec.n_layers} layers")
        self.cfg, self.spec = cfg, spec
        self.hidden_size, self.rows = prefix_layout(inner, cfg)
        p = cfg.n_prefixes
        self.banks = nn.ParameterDict()
        for li, layer in enumerate(inner.layers):
            for name, w in layer.w.items():
                emb = w.new_zeros(p, self.hidden_size)
                emb[:, : w.numel() // p] = w.reshape(p, -1)  # rows j*r..j*r+r-1 of W, flattened, in prefix j
                self.banks[f"L{li}_{name}"] = nn.Parameter(emb, requires_grad=False)
        self.register_buffer("embed", inner.embed.detach().clone())
        self.register_buffer("out_embed", inner.lm_head.detach().clone())
        self.bottom = nn.ModuleList(self._layer_forward(inner, li, "b") for li in range(spec.n_layers - cfg.k))
        top = range(spec.n_layers - cfg.k, spec.n_layers)
        self.forward1 = nn.ModuleList(self._layer_forward(inner, li, f"L{li}") for li in top)
        self.loss_grad = LossGradient(inner, f"L{spec.n_layers - 1}.out", "grad", cfg.finite_diff_n)
        self.backward_descent = nn.ModuleList(self._layer_backward(inner, li) for li in reversed(top))
        self.forward2 = nn.ModuleList(self._layer_forward(inner, li, f"F{li}", first=(li == top.start))
                                      for li in top)
        self.final_norm = RMSNormForward(f"F{spec.n_layers - 1}.out", "final.n", "final.x", inner.norm, spec.eps)

    # one inner layer's forward, memory slots prefixed by ``tag``
    def _layer_forward(self, inner: InnerModel, li: int, tag: str, first: bool = False) -> nn.Sequential:
        spec, p, eps = self.spec, self.cfg.n_prefixes, self.spec.eps
        layer = inner.layers[li]
        src = self._input_slot(li, tag, first)

        def lin(n: str, a: str, b: str) -> LinearForward:
            return LinearForward(f"L{li}_{n}", *spec.shape(n), p, a, b)

        return nn.Sequential(
            _Copy(src, f"{tag}.h"),
            RMSNormForward(f"{tag}.h", f"{tag}.n1", f"{tag}.x1", layer.ln1, eps),
            lin("q", f"{tag}.x1", f"{tag}.q"), lin("k", f"{tag}.x1", f"{tag}.k"), lin("v", f"{tag}.x1", f"{tag}.v"),
            SelfAttentionForward(spec.n_heads, spec.n_kv_heads, spec.head_dim, f"{tag}.q", f"{tag}.k", f"{tag}.v",
                                 f"{tag}.o", f"{tag}.att", inner),
            lin("o", f"{tag}.o", f"{tag}.ao"), Residual(f"{tag}.h", f"{tag}.ao", f"{tag}.h2"),
            RMSNormForward(f"{tag}.h2", f"{tag}.n2", f"{tag}.x2", layer.ln2, eps),
            lin("gate", f"{tag}.x2", f"{tag}.g"), lin("up", f"{tag}.x2", f"{tag}.u"),
            SwiGLUForward(f"{tag}.g", f"{tag}.u", f"{tag}.m"),
            lin("down", f"{tag}.m", f"{tag}.mo"), Residual(f"{tag}.h2", f"{tag}.mo", f"{tag}.out"),
        )

    def _input_slot(self, li: int, tag: str, first: bool) -> str:
        n_bottom = self.spec.n_layers - self.cfg.k
        if tag == "b":
            return "b.out" if li else "embedding"
        if tag.startswith("L"):
            return ("b.out" if n_bottom else "embedding") if li == n_bottom else f"L{li - 1}.out"
        return f"L{li}.h" if first else f"F{li - 1}.out"  # the second forward starts from memory

    def _layer_backward(self, inner: InnerModel, li: int) -> nn.Sequential:
        spec, p, n, lr = self.spec, self.cfg.n_prefixes, self.cfg.finite_diff_n, self.cfg.inner_lr
        eps, tag = self.spec.eps, f"L{li}"
        layer = inner.layers[li]

        def back(w: str, g: str, d: str, add: bool = False) -> LinearBackward:
            return LinearBackward(f"L{li}_{w}", *spec.shape(w), p, g, d, add)

        def desc(w: str, g: str, x: str) -> LinearDescent:
            return LinearDescent(f"L{li}_{w}", *spec.shape(w), p, g, x, lr)

        return nn.Sequential(
            # MLP: grad holds d out
            back("down", "grad", f"{tag}.dm"), desc("down", "grad", f"{tag}.m"),
            SwiGLUBackward(f"{tag}.g", f"{tag}.u", f"{tag}.dm", f"{tag}.dg", f"{tag}.du", n),
            back("gate", f"{tag}.dg", f"{tag}.dx2"), back("up", f"{tag}.du", f"{tag}.dx2", add=True),
            desc("gate", f"{tag}.dg", f"{tag}.x2"), desc("up", f"{tag}.du", f"{tag}.x2"),
            RMSNormBackward(f"{tag}.h2", f"{tag}.dx2", "grad", layer.ln2, eps, n),   # grad: d h2
            # attention
            back("o", "grad", f"{tag}.do"), desc("o", "grad", f"{tag}.o"),
            SelfAttentionBackward(spec.n_heads, spec.n_kv_heads, spec.head_dim, f"{tag}.att", f"{tag}.do", f"{tag}.dv"),
            back("v", f"{tag}.dv", f"{tag}.dx1"), desc("v", f"{tag}.dv", f"{tag}.x1"),
            RMSNormBackward(f"{tag}.h", f"{tag}.dx1", "grad", layer.ln1, eps, n),     # grad: d h
        )

    def initial_state(self, ids: Tensor, n_train: int) -> TintState:
        """Prefix banks at their pretrained values; input tokens embedded (the output embedding
        of each token is kept too, for the loss gradient)."""
        prefix = {name: bank.detach() for name, bank in self.banks.items()}
        stream = {"embedding": self.embed[ids], "target_embedding": self.out_embed[ids]}
        return TintState(prefix, stream, n_train)

    @torch.no_grad()
    def forward(self, ids: Tensor, n_train: int, loss_mask: Tensor) -> Tensor:
        check_split(ids, n_train, loss_mask)
        s = self.initial_state(ids, n_train)
        for block in [*self.bottom, *self.forward1]:
            s = block(s)
        s = self.loss_grad(s, loss_mask)
        for block in self.backward_descent:
            s = block(s)
        for block in self.forward2:
            s = block(s)
        s = self.final_norm(s)
        return s.stream["final.x"][n_train:] @ self.out_embed.T

    def n_parameters(self) -> dict[str, int]:
        """Prefix-embedding parameters (the inner linear weights, zero-padded to the TinT hidden
        size), fixed buffers (norm gains, embeddings), and the count a dense TinT would have:
        four H x H projections per attention module (linear forward/backward/descent, inner
        attention forward/backward) at hidden size H."""
        prefix = sum(b.numel() for b in self.banks.values())
        buffers = sum(b.numel() for b in self.buffers())
        n_attn = sum(isinstance(m, (LinearForward, LinearBackward, LinearDescent, SelfAttentionForward,
                                    SelfAttentionBackward)) for m in self.modules())
        return {"prefix": prefix, "buffers": buffers, "attention_modules": n_attn,
                "dense_equivalent": prefix + buffers + n_attn * 4 * self.hidden_size ** 2}


class _Copy(nn.Module):
    def __init__(self, src: str, dst: str) -> None:
        super().__init__()
        self.src, self.dst = src, dst

    def forward(self, s: TintState) -> TintState:
        s.stream[self.dst] = s.stream[self.src]
        return s


def build_tint(model: nn.Module | InnerModel, cfg: TintConfig, dtype: torch.dtype | None = None) -> Tint:
    """A TinT from a Hugging Face Llama-style model (or an :class:`InnerModel`); refuses an
    architecture it cannot simulate, naming the missing piece."""
    from ftlab.tint.inner import inner_from_hf
    inner = model if isinstance(model, InnerModel) else inner_from_hf(model, dtype)
    return Tint(inner, cfg)
