"""Prefix tuning: learnable key/value prefixes for every attention layer of a frozen causal LM.

Our own implementation (peft's prefix tuning is brittle with the transformers 5 cache objects):
the prefixes are fed to the base model as an already-filled key/value cache, so the caller's
tokens attend to ``num_tokens`` virtual tokens at positions ``0..num_tokens-1`` and sit at
positions ``num_tokens..`` themselves, exactly as if those tokens had been prepended.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from ftlab.config import PrefixSettings
from ftlab.errors import FtlabError
from ftlab.io import atomic_dir, atomic_write_json

PREFIX_CONFIG = "prefix_config.json"
PREFIX_WEIGHTS = "prefix.safetensors"
_INITS = ("real_activations", "random")
# transformers >= 4.56 builds per-layer cache types (e.g. sliding-window layers) from a config.
_CACHE_TAKES_CONFIG = "config" in inspect.signature(DynamicCache.__init__).parameters


def _check(settings: PrefixSettings) -> None:
    if not (isinstance(settings.num_tokens, int) and settings.num_tokens > 0):
        raise FtlabError(f"prefix.num_tokens must be a positive integer, got {settings.num_tokens!r}")
    if settings.init not in _INITS:
        raise FtlabError(f"prefix.init {settings.init!r} is unknown; choose one of {list(_INITS)}")


def _cache_layers(cache: Any, num_layers: int) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (keys, values), each (batch, kv_heads, seq, head_dim), across cache APIs."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        states = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):  # transformers 4.46 - 4.55
        states = list(zip(cache.key_cache, cache.value_cache))
    else:  # legacy tuple of tuples
        states = [(k, v) for k, v, *_ in cache]
    if len(states) != num_layers or any(k is None or k.numel() == 0 for k, _ in states):
        raise FtlabError(f"prefix tuning needs one key/value cache entry per layer; this model's cache "
                         f"has {len(states)} for {num_layers} layers (shared or missing caches are "
                         "not supported)")
    return states


class PrefixModel(nn.Module):
    """A frozen causal LM with learnable key/value prefixes (``num_tokens`` long) in every layer.

    ``forward`` takes the caller's tokens only: ``attention_mask`` and ``position_ids`` cover
    them (positions 0-based; by default ``attention_mask.cumsum(-1) - 1``, so left padding works).
    The prefix is added as a pre-filled cache, its ones are prepended to the mask and positions
    are shifted by ``num_tokens``. A ``past_key_values`` returned by an earlier call already
    holds the prefix and is extended as usual (incremental decoding).
    """

    def __init__(self, base_model: PreTrainedModel, settings: PrefixSettings | None = None, *,
                 seed: int = 0) -> None:
        super().__init__()
        self.settings = settings or PrefixSettings()
        _check(self.settings)
        self.seed = seed
        self.base_model = base_model
        base_model.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        vocab = base_model.get_input_embeddings().num_embeddings
        self.init_token_ids = torch.randint(vocab, (self.settings.num_tokens,), generator=generator)
        keys, values = self._real_activations(self.init_token_ids)
        if self.settings.init == "random":
            keys, values = _gaussian_like(keys, generator), _gaussian_like(values, generator)
        self.prefix_keys = nn.ParameterList(nn.Parameter(k) for k in keys)
        self.prefix_values = nn.ParameterList(nn.Parameter(v) for v in values)

    @property
    def config(self) -> Any:
        """The base model's config (so code that reads ``model.config`` works on the wrapper)."""
        return self.base_model.config

    @property
    def num_tokens(self) -> int:
        """How many virtual tokens the prefix holds."""
        return self.settings.num_tokens

    @torch.no_grad()
    def _real_activations(self, token_ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer keys and values, each (kv_heads, num_tokens, head_dim), of ``token_ids``."""
        device = next(self.base_model.parameters()).device
        was_training = self.base_model.training
        self.base_model.eval()  # no dropout in the activations we copy
        try:
            out = self.base_model(input_ids=token_ids[None].to(device), past_key_values=self._empty_cache(),
                                  use_cache=True)
        finally:
            self.base_model.train(was_training)
        states = _cache_layers(out.past_key_values, self.base_model.config.get_text_config().num_hidden_layers)
        if any(k.shape[-2] != len(token_ids) for k, _ in states):  # a sliding window shorter than the prefix
            raise FtlabError(f"prefix.num_tokens={len(token_ids)} does not fit in this model's attention "
                             "window; use fewer prefix tokens")
        return [k[0].detach().clone() for k, _ in states], [v[0].detach().clone() for _, v in states]

    def _empty_cache(self) -> DynamicCache:
        if _CACHE_TAKES_CONFIG:
            return DynamicCache(config=self.base_model.config)
        return DynamicCache()

    def _fill(self, cache: DynamicCache, batch_size: int) -> None:
        # Expanded views of the parameters: the cache concatenates them, so gradients flow back.
        for i, (k, v) in enumerate(zip(self.prefix_keys, self.prefix_values)):
            cache.update(k.expand(batch_size, *k.shape), v.expand(batch_size, *v.shape), i)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False, **kwargs: Any) -> Any:
        """The base model's output (``logits``, ``past_key_values``, ...) on the caller's tokens."""
        batch, length = input_ids.shape
        if past_key_values is None:
            past_key_values = self._empty_cache()
        if past_key_values.get_seq_length() == 0:  # fresh (ours or a generation loop's): add the prefix
            self._fill(past_key_values, batch)
        if attention_mask is None:
            seen = past_key_values.get_seq_length() - self.num_tokens
            attention_mask = torch.ones((batch, seen + length), dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        prefix_mask = attention_mask.new_ones((batch, self.num_tokens))
        return self.base_model(input_ids=input_ids, attention_mask=torch.cat([prefix_mask, attention_mask], 1),
                               position_ids=position_ids + self.num_tokens, past_key_values=past_key_values,
                               use_cache=use_cache, **kwargs)

    def prefix_state(self) -> dict[str, Tensor]:
        """The prefix tensors by name, as saved by :meth:`save_pretrained`."""
        return {n: p.detach() for n, p in self.named_parameters() if n.startswith("prefix_")}

    def write(self, folder: Path) -> None:
        """Write the prefix and its settings into an existing ``folder`` (not atomic; see
        :meth:`save_pretrained`)."""
        save_file({n: t.to("cpu").contiguous() for n, t in self.prefix_state().items()},
                  str(folder / PREFIX_WEIGHTS))
        atomic_write_json(folder / PREFIX_CONFIG, {
            **asdict(self.settings), "seed": self.seed, "init_token_ids": self.init_token_ids.tolist(),
            "model_type": self.config.model_type, "num_layers": len(self.prefix_keys)})

    def save_pretrained(self, path: str | Path) -> None:
        """Save the prefix (safetensors) and settings (JSON) to folder ``path``, atomically."""
        with atomic_dir(path) as tmp:
            self.write(tmp)

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, path: str | Path) -> "PrefixModel":
        """Wrap ``base_model`` with the prefix saved in ``path`` by :meth:`save_pretrained`."""
        path = Path(path)
        try:
            meta = json.loads((path / PREFIX_CONFIG).read_text())
            state = load_file(str(path / PREFIX_WEIGHTS))
        except (OSError, ValueError) as e:
            raise FtlabError(f"{path}: not a saved prefix ({PREFIX_CONFIG} + {PREFIX_WEIGHTS}): {e}") from e
        if meta.get("model_type") != base_model.config.model_type:
            raise FtlabError(f"{path}: the prefix was trained for a {meta.get('model_type')!r} model, "
                             f"not {base_model.config.model_type!r}; pass the base model it was trained on")
        settings = PrefixSettings(num_tokens=meta["num_tokens"], init=meta["init"])
        model = cls(base_model, settings, seed=meta["seed"])
        own = model.prefix_state()
        bad = sorted(n for n in own.keys() | state.keys()
                     if n not in own or n not in state or own[n].shape != state[n].shape)
        if bad:
            raise FtlabError(f"{path}: the prefix does not fit this model (tensor {bad[0]} differs); it "
                             f"was trained for a model with {meta.get('num_layers')} layers")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in state:
                    param.copy_(state[name])
        return model


def _gaussian_like(tensors: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Gaussian tensors with the shape, mean and std of each of ``tensors``."""
    out = []
    for t in tensors:
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        out.append((noise * t.float().std() + t.float().mean()).to(t.dtype).to(t.device))
    return out
