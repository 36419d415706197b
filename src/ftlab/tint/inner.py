"""The inner (auxiliary) model TinT simulates: a Llama-style causal LM as plain tensors.

:func:`inner_from_hf` reads a Hugging Face ``LlamaForCausalLM`` (SmolLM2, tiny random configs)
into an :class:`InnerModel` (weights per layer, rotary tables, sizes) and refuses, in one line
naming the missing piece, any architecture this module cannot simulate (GPT-2/OPT layouts,
Gemma-3's query/key norms and GELU gates, biases, scaled rotary, ...).

:func:`layer_forward` is one decoder layer written out (RMSNorm, rotary, grouped-query causal
softmax attention, SwiGLU), returning what the backward pass needs; :func:`forward` runs the
whole model. Everything is plain PyTorch, so autograd through it is the exact gradient and the
hand-written approximate backward of :mod:`ftlab.tint.reference` can be checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ftlab.errors import FtlabError

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
_HF_LINEAR = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass
class InnerSpec:
    """Sizes of a Llama-style model."""

    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    vocab: int
    eps: float
    rope_theta: float

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def shape(self, name: str) -> tuple[int, int]:
        """(out, in) of linear weight ``name``."""
        d, m, hd = self.hidden, self.intermediate, self.head_dim
        return {"q": (self.n_heads * hd, d), "k": (self.n_kv_heads * hd, d), "v": (self.n_kv_heads * hd, d),
                "o": (d, self.n_heads * hd), "gate": (m, d), "up": (m, d), "down": (d, m)}[name]


@dataclass
class InnerLayer:
    """One decoder layer: seven linear weights (out x in) and two RMSNorm gains."""

    w: dict[str, Tensor]
    ln1: Tensor
    ln2: Tensor

    def with_weights(self, w: dict[str, Tensor]) -> "InnerLayer":
        return InnerLayer({**self.w, **w}, self.ln1, self.ln2)


@dataclass
class InnerModel:
    """A Llama-style causal LM as tensors (all of one dtype)."""

    spec: InnerSpec
    embed: Tensor            # (vocab, hidden) input embedding
    layers: list[InnerLayer]
    norm: Tensor             # final RMSNorm gain
    lm_head: Tensor          # (vocab, hidden); the same tensor as ``embed`` when tied
    inv_freq: Tensor = field(repr=False)  # rotary inverse frequencies, float32 as in transformers

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin tables (T, head_dim), computed as transformers does (float32, then cast)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def n_parameters(self) -> int:
        tied = self.lm_head is self.embed
        n = self.embed.numel() + self.norm.numel() + (0 if tied else self.lm_head.numel())
        for layer in self.layers:
            n += sum(t.numel() for t in layer.w.values()) + layer.ln1.numel() + layer.ln2.numel()
        return n


def _fail(what: str) -> FtlabError:
    return FtlabError(f"TinT cannot simulate this model: {what}; supported: Llama-style causal LMs "
                      "(RMSNorm, SwiGLU with SiLU, default rotary positions, grouped-query attention, no biases)")


def check_supported(model: nn.Module) -> None:
    """Raise :class:`FtlabError` naming the first piece TinT cannot simulate."""
    cfg = getattr(model, "config", None)
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if cfg is None or layers is None or not len(layers):
        raise _fail(f"{type(model).__name__} has no Llama-style decoder layers (model.model.layers); "
                    "GPT-2/OPT layouts (LayerNorm, GELU MLP, learned positions) are not implemented")
    layer = layers[0]
    for _key, path in _HF_LINEAR.items():
        mod = layer.get_submodule(path) if _has(layer, path) else None
        if not isinstance(mod, nn.Linear):
            raise _fail(f"decoder layer has no linear {path} ({type(model).__name__})")
        if mod.bias is not None:
            raise _fail(f"{path} has a bias")
    for extra in ("self_attn.q_norm", "self_attn.k_norm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
        if _has(layer, extra):
            raise _fail(f"the decoder layer has {extra} (e.g. Gemma-3's query/key norms and sandwich norms)")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        mod = layer.get_submodule(norm) if _has(layer, norm) else None
        if mod is None or "RMSNorm" not in type(mod).__name__ or getattr(mod, "bias", None) is not None:
            raise _fail(f"{norm} is not an RMSNorm ({type(mod).__name__})")
    if "gemma" in type(layer.get_submodule("input_layernorm")).__name__.lower():
        raise _fail("Gemma's RMSNorm computes (1 + weight) * x and scales the embeddings")
    act = getattr(cfg, "hidden_act", None)
    if act != "silu":
        raise _fail(f"MLP activation {act!r} (only SiLU gates: SwiGLU)")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise _fail(f"rotary scaling {rope.get('rope_type')!r} (only default rotary positions)")
    if getattr(cfg, "sliding_window", None):
        raise _fail("sliding-window attention")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def inner_from_hf(model: nn.Module, dtype: torch.dtype | None = None) -> InnerModel:
    """The weights of a Hugging Face Llama-style causal LM as an :class:`InnerModel` (copies,
    in ``dtype`` or the model's own)."""
    check_supported(model)
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    grab = lambda t: t.detach().to(dtype).clone()  # noqa: E731
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    spec = InnerSpec(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, n_heads=cfg.num_attention_heads,
                     n_kv_heads=cfg.num_key_value_heads, head_dim=hd, n_layers=len(model.model.layers),
                     vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps), rope_theta=theta)
    layers = [InnerLayer({k: grab(layer.get_submodule(p).weight) for k, p in _HF_LINEAR.items()},
                         grab(layer.input_layernorm.weight), grab(layer.post_attention_layernorm.weight))
              for layer in model.model.layers]
    embed = grab(model.model.embed_tokens.weight)
    head = model.get_output_embeddings().weight
    lm_head = embed if head is model.model.embed_tokens.weight else grab(head)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    return InnerModel(spec, embed, layers, grab(model.model.norm.weight), lm_head, inv_freq)


# --------------------------------------------------------------------------- the forward pass

def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x): RMSNorm without its gain."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary positions on (..., T, head_dim) (the rotate-half convention of transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse (= transpose) of :func:`rotate`."""
    return rotate(x, cos, -sin)


def causal_scores(q: Tensor, k: Tensor) -> Tensor:
    """Softmax attention probabilities (heads, T, T) of rotated queries/keys (heads, T, hd)."""
    t = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)


@dataclass
class LayerCache:
    """What one layer's forward keeps for the backward pass (all (T, ...) tensors)."""

    h: Tensor      # layer input (residual stream)
    n1: Tensor     # rms_normalize(h)
    x1: Tensor     # ln1 * n1: input of q, k, v
    q: Tensor      # (heads, T, hd), rotated
    k: Tensor      # (kv heads, T, hd), rotated
    v: Tensor      # (kv heads, T, hd)
    a: Tensor      # (heads, T, T) attention probabilities
    o: Tensor      # (T, heads*hd): input of o_proj
    h2: Tensor     # residual after attention
    n2: Tensor
    x2: Tensor     # input of gate/up
    g: Tensor      # gate pre-activation
    u: Tensor      # up projection
    m: Tensor      # silu(g) * u: input of down_proj


def layer_forward(spec: InnerSpec, layer: InnerLayer, h: Tensor, cos: Tensor, sin: Tensor,
                  stop_scores: bool = False) -> tuple[Tensor, LayerCache]:
    """One decoder layer on (T, hidden); ``stop_scores`` detaches the attention probabilities
    (autograd then follows TinT's first approximation)."""
    w, t, hd = layer.w, h.shape[0], spec.head_dim
    n1 = rms_normalize(h, spec.eps)
    x1 = layer.ln1 * n1
    q = rotate((x1 @ w["q"].T).view(t, spec.n_heads, hd).transpose(0, 1), cos, sin)
    k = rotate((x1 @ w["k"].T).view(t, spec.n_kv_heads, hd).transpose(0, 1), cos, sin)
    v = (x1 @ w["v"].T).view(t, spec.n_kv_heads, hd).transpose(0, 1)
    kk, vv = k.repeat_interleave(spec.group, 0), v.repeat_interleave(spec.group, 0)
    a = causal_scores(q, kk)
    o = ((a.detach() if stop_scores else a) @ vv).transpose(0, 1).reshape(t, spec.n_heads * hd)
    h2 = h + o @ w["o"].T
    n2 = rms_normalize(h2, spec.eps)
    x2 = layer.ln2 * n2
    g, u = x2 @ w["gate"].T, x2 @ w["up"].T
    m = F.silu(g) * u
    out = h2 + m @ w["down"].T
    return out, LayerCache(h, n1, x1, q, k, v, a, o, h2, n2, x2, g, u, m)


def logits_of(model: InnerModel, h: Tensor) -> Tensor:
    """LM-head logits of final hidden states."""
    return (model.norm * rms_normalize(h, model.spec.eps)) @ model.lm_head.T


def forward(model: InnerModel, ids: Tensor, layers: list[InnerLayer] | None = None, start: int = 0,
            h: Tensor | None = None, last_only: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Logits (T, vocab) of one sequence ``ids`` (T,), and each layer's input hidden state.

    ``layers`` replaces the model's layers; with ``start`` and ``h`` the pass begins at layer
    ``start`` from hidden state ``h`` (reusing the unchanged bottom of the model); ``last_only``:
    logits of the last position only."""
    layers = model.layers if layers is None else layers
    positions = torch.arange(ids.shape[0], device=ids.device)
    cos, sin = model.rotary(positions, model.embed.dtype)
    h = model.embed[ids] if h is None else h
    inputs = []
    for layer in layers[start:]:
        inputs.append(h)
        h, _ = layer_forward(model.spec, layer, h, cos, sin)
    return logits_of(model, h[-1:] if last_only else h), inputs
