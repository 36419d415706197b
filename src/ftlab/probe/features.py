"""Features of a causal LM at the end of a prompt (Saunshi, Malladi, Arora, ICLR 2021).

For a prompt s the language model computes ``f(s)`` (the last hidden state, the input of the
output layer), logits ``Phi^T f(s)`` with ``Phi`` the ``d x V`` output word embeddings, and the
next-word distribution ``p_f(s) = softmax(Phi^T f(s))``. The paper's features:

* ``f``      -- ``f(s)`` itself (``d`` numbers);
* ``phi_p``  -- the conditional-mean feature ``Phi p_f(s) = sum_w p_f(s)_w phi_w``, the output
  embeddings averaged under the next-word distribution (``d`` numbers);
* ``p_words``-- ``p_f(s)`` restricted to a subset of words (the task's label words, or a given
  list of single-token "indicator words"); probabilities, not renormalised;
* ``layer``  -- the hidden state after block ``L`` at the prompt's end (an intermediate layer).

One forward per batch (left-padded, so every prompt ends at the last position): the head runs
on the last position only (``logits_to_keep=1``), ``f(s)`` is read off the head's input by a
forward pre-hook, and ``Phi p`` is one ``(B x V) @ (V x d)`` product with the head's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ftlab.errors import FtlabError
from ftlab.models.head import output_head
from ftlab.objectives import Encoder, ModelBatch

KINDS = ("f", "phi_p", "p_words", "layer")


@dataclass(frozen=True)
class FeatureSpec:
    """What to extract: ``kinds`` (from :data:`KINDS`), the word ids of ``p_words`` and the block
    of ``layer`` (``0`` = embeddings, ``num_hidden_layers`` = the last block's output)."""

    kinds: tuple[str, ...] = ("f", "phi_p")
    word_ids: tuple[int, ...] = ()
    layer: int | None = None

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise FtlabError(f"feature kinds {list(self.kinds)}: choose among {list(KINDS)}")
        if "p_words" in self.kinds and not self.word_ids:
            raise FtlabError("feature kind p_words needs words (the label words or a --words list)")
        if "layer" in self.kinds and self.layer is None:
            raise FtlabError("feature kind layer needs a layer index (--layer)")


def single_token_ids(tokenizer, words: Sequence[str]) -> tuple[int, ...]:
    """The token id of each word; raises if a word is not exactly one token (say which, and how many)."""
    ids = []
    for word in words:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise FtlabError(f"word {word!r} is {len(toks)} tokens {toks} for this tokenizer; p restricted to "
                             "words needs single-token words (mind the leading space, e.g. ' great')")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise FtlabError(f"words {list(words)} contain repeats after tokenisation ({ids})")
    return tuple(ids)


def middle_layer(model: nn.Module) -> int:
    """The middle block of ``model`` (``num_hidden_layers // 2``)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n:
        raise FtlabError("cannot tell the model's number of layers; give --layer explicitly")
    return int(n) // 2


def output_matrix(model: nn.Module) -> Tensor:
    """The output word embeddings ``Phi^T`` as the head's ``V x d`` weight."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, nn.Linear):
        raise FtlabError("conditional-mean features need a model whose output layer is a plain linear map "
                         f"(got {type(head).__name__})")
    return head.weight


def prompt_batch(encoder: Encoder, prompts: Sequence[str]) -> ModelBatch:
    """Left-padded prompt rows (one per prompt, no targets)."""
    return encoder.generation(list(prompts), answers=None, max_new_tokens=0)


@torch.no_grad()
def batch_features(model: nn.Module, batch: ModelBatch, spec: FeatureSpec) -> dict[str, Tensor]:
    """The features of one left-padded batch, float32 ``(B, dim)`` per kind: one forward."""
    head = model.get_output_embeddings()
    captured: dict[str, Tensor] = {}
    handle = head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("f", args[0][:, -1]))
    try:
        with output_head(model):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, logits_to_keep=1, use_cache=False,
                        output_hidden_states="layer" in spec.kinds)
    finally:
        handle.remove()
    result: dict[str, Tensor] = {}
    if "f" in spec.kinds:
        result["f"] = captured["f"].float()
    if "phi_p" in spec.kinds or "p_words" in spec.kinds:
        p = torch.softmax(out.logits[:, -1].float(), dim=-1)
        if "phi_p" in spec.kinds:
            result["phi_p"] = p @ output_matrix(model).float()
        if "p_words" in spec.kinds:
            result["p_words"] = p[:, list(spec.word_ids)]
    if "layer" in spec.kinds:
        states = out.hidden_states
        if not 0 <= spec.layer < len(states):
            raise FtlabError(f"layer {spec.layer} does not exist: the model has layers 0..{len(states) - 1}")
        result["layer"] = states[spec.layer][:, -1].float()
    return result


def extract(model: nn.Module, encoder: Encoder, prompts: Sequence[str], spec: FeatureSpec,
            batch_size: int = 16) -> dict[str, Tensor]:
    """Features of ``prompts`` in their order, batched by length (least padding)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {k: [] for k in spec.kinds}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            feats = batch_features(model, prompt_batch(encoder, [prompts[i] for i in idx]).to(device), spec)
            for k in spec.kinds:
                parts[k].append(feats[k].cpu())
    finally:
        model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {k: torch.cat(v)[inverse] for k, v in parts.items()}
