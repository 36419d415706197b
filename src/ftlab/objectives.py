"""Prompt-based objectives: turning examples into token batches, scoring options, the training
loss, greedy decoding, and the metrics (accuracy, SQuAD F1/EM).

Classification is scored by the mean log-probability of each option's tokens after the prompt.
Batches are *left*-padded so every row ends at the last position: the model then only needs
logits for the last few positions (``logits_to_keep``), which saves the vocabulary projection
and a (batch x length x vocab) log-softmax on every other position.
"""

from __future__ import annotations

import collections
import random
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftlab.collate import left_pad, pad_id, position_ids, right_aligned_labels
from ftlab.errors import FtlabError
from ftlab.models.head import output_head
from ftlab.tasks.base import Example, TaskSpec

ANSWER_END = "\n"  # generation targets end with a newline, which greedy decoding stops at


@dataclass
class ModelBatch:
    """A left-padded batch ready for the model.

    ``labels`` (rows x L, right-aligned, -100 = ignore) are the target tokens at the last L
    positions; it is ``None`` when only the next-token distribution after the prompt is needed
    (single-token options, or decoding). For multi-token options each example has
    ``n_options`` consecutive rows, one per option.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor | None
    n_options: int
    gold: Tensor | None  # (B,) gold option index, classification only

    @classmethod
    def left_padded(cls, rows: Sequence[Sequence[int]], pad_id: int, targets: Sequence[Sequence[int]] | None = None,
                    n_options: int = 1, gold: Tensor | None = None) -> ModelBatch:
        """Token ``rows`` left-padded (:mod:`ftlab.collate`), with ``targets`` (each the tokens
        its row ends with) as right-aligned labels."""
        ids, mask = left_pad(rows, pad_id)
        labels = None if targets is None else right_aligned_labels(targets)
        return cls(ids, mask, position_ids(mask), labels, n_options, gold)

    def to(self, device: torch.device | str) -> "ModelBatch":
        return self.map_tensors(lambda t: t.to(device))

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "ModelBatch":
        """The batch with ``fn`` applied to each of its tensors (absent ones stay None)."""
        def apply(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)
        return ModelBatch(apply(self.input_ids), apply(self.attention_mask), apply(self.position_ids),
                          apply(self.labels), self.n_options, apply(self.gold))


def encode_options(tokenizer, options: Sequence[str]) -> list[list[int]]:
    """Token ids of each option; raises if one is empty or two tokenise identically."""
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    seen: dict[tuple[int, ...], str] = {}
    for option, toks in zip(options, ids):
        if not toks:
            raise FtlabError(f"label word {option!r} tokenises to nothing; pick a non-empty word")
        if tuple(toks) in seen:
            raise FtlabError(
                f"label words {seen[tuple(toks)]!r} and {option!r} tokenise identically "
                f"({toks}); pick words that differ after tokenisation"
            )
        seen[tuple(toks)] = option
    return ids


def build_prompts(spec: TaskSpec, examples: Sequence[Example], demos: Sequence[Example] = (),
                  k: int = 0, seed: int = 0) -> list[str]:
    """Prompts for ``examples``, each preceded by ``k`` solved demonstrations.

    Demonstrations are drawn per query from ``demos`` (never the query itself) with a
    generator seeded by ``seed`` and the query id, so the prompt of an example does not depend
    on which batch it lands in.
    """
    if k and len(demos) < k:
        raise FtlabError(f"{k}-shot prompts need >= {k} demonstration examples, got {len(demos)}")
    prompts = []
    for ex in examples:
        parts = []
        if k:
            rng = random.Random(f"{seed}:{ex.id}")
            pool = [d for d in demos if d.id != ex.id]
            parts = [spec.demonstration(d) for d in rng.sample(pool, k)]
        prompts.append(spec.demo_separator.join(parts + [spec.prompt(ex)]))
    return prompts


# A prompt longer than this many characters per token of its budget is cut (as text, from the
# left) before it is tokenised: a 100 MB row must not be tokenised whole only to keep its end.
CHARS_PER_TOKEN_BOUND = 16


def prompt_ids(tokenizer: Any, prompt: str, budget: int, special_tokens: bool = True) -> list[int]:
    """Ids of ``prompt`` cut from the left to ``budget`` tokens (the query sits at the end),
    keeping the BOS the tokenizer prepends (``special_tokens``; off for chat-templated text,
    which holds its own).

    Only the last ``budget * CHARS_PER_TOKEN_BOUND`` characters are tokenised (more, by
    quadrupling, if those hold no more than ``budget`` tokens), so the cost is bounded by the
    budget, not by the text. Prompts shorter than that are tokenised whole, as before."""
    window = max(1, budget) * CHARS_PER_TOKEN_BOUND
    while len(prompt) > window:
        tail = prompt[-window:]
        # Start at a word boundary, so the tail's words tokenise as they do in the whole text.
        cut = re.search(r"\s", tail[:window // 2])
        ids = tokenizer(tail[cut.start():] if cut else tail, add_special_tokens=special_tokens)["input_ids"]
        # More than budget (+ BOS) tokens: the first, possibly cut, token is dropped below.
        if len(ids) > budget + 1:
            break
        window *= 4
    else:
        ids = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
    if len(ids) <= budget:
        return ids
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and ids[0] == bos
    return ([bos] if keep_bos else []) + ids[len(ids) - budget + keep_bos:]


class Encoder:
    """Tokenises prompts (and targets) of one task into :class:`ModelBatch` es."""

    def __init__(self, tokenizer, spec: TaskSpec, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
        self.pad_id = pad_id(tokenizer)
        self.option_ids = encode_options(tokenizer, spec.options) if spec.options else []
        self.single_token = bool(self.option_ids) and all(len(o) == 1 for o in self.option_ids)
        self.end_ids = tokenizer(ANSWER_END, add_special_tokens=False)["input_ids"]

    def classification(self, examples: Sequence[Example], prompts: Sequence[str]) -> ModelBatch:
        """Rows to score every option of every example (one row per example if all options
        are single tokens, else one row per example and option)."""
        gold = torch.tensor([-1 if ex.label is None else ex.label for ex in examples])
        longest = max(len(o) for o in self.option_ids)
        if self.single_token:
            rows = [prompt_ids(self.tokenizer, p, self.max_length) for p in prompts]
            return ModelBatch.left_padded(rows, self.pad_id, n_options=len(self.option_ids), gold=gold)
        rows, targets = [], []
        for p in prompts:
            ids = prompt_ids(self.tokenizer, p, self.max_length - longest)
            for opt in self.option_ids:
                rows.append(ids + opt)
                targets.append(opt)
        return ModelBatch.left_padded(rows, self.pad_id, targets, n_options=len(self.option_ids), gold=gold)

    def generation(self, prompts: Sequence[str], answers: Sequence[str] | None = None,
                   max_new_tokens: int = 0) -> ModelBatch:
        """Rows for the answer loss (``answers`` given) or for decoding (``answers=None``)."""
        if answers is None:
            rows = [prompt_ids(self.tokenizer, p, self.max_length - max_new_tokens) for p in prompts]
            return ModelBatch.left_padded(rows, self.pad_id)
        rows, targets = [], []
        for prompt, answer in zip(prompts, answers):
            # An answer is cut to leave room for one conditioning token; when the prompt gives none
            # (an empty prompt: plain language modelling), the answer's first token becomes it.
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + self.end_ids
            target = target[:self.max_length - 1]
            context = prompt_ids(self.tokenizer, prompt, self.max_length - len(target))
            if not context:
                context, target = target[:1], target[1:]
            rows.append(context + target)
            targets.append(target)
        return ModelBatch.left_padded(rows, self.pad_id, targets)


def _last_logits(model: nn.Module, batch: ModelBatch, keep: int) -> Tensor:
    """Logits at the last ``keep`` positions, in at least float32 (log-softmax over a large
    vocabulary in bf16/fp16 loses the small differences between options)."""
    with output_head(model):  # one plain matmul for the kept positions, see ftlab.models.head
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, -keep:]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def target_logprobs(model: nn.Module, batch: ModelBatch) -> Tensor:
    """Mean log-probability of each row's target tokens, shape (rows,)."""
    assert batch.labels is not None
    span = batch.labels.shape[1]
    # Logits at position t predict token t+1: the last `span` targets need positions -span-1..-2.
    logits = _last_logits(model, batch, span + 1)[:, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    valid = batch.labels != -100
    picked = logp.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1) / valid.sum(-1)


def option_scores(model: nn.Module, batch: ModelBatch, option_ids: list[list[int]]) -> Tensor:
    """Score of every option for every example, shape (B, C): mean log-prob of its tokens."""
    if batch.labels is None:  # single-token options: one forward, read the last position
        logp = torch.log_softmax(_last_logits(model, batch, 1)[:, -1], dim=-1)
        return logp[:, [o[0] for o in option_ids]]
    return target_logprobs(model, batch).view(-1, batch.n_options)


def loss(model: nn.Module, batch: ModelBatch, option_ids: list[list[int]]) -> Tensor:
    """The training loss: cross-entropy over option scores (classification; equal to the
    cross-entropy over label-word logits for single-token options), or the mean per-token
    negative log-likelihood of the answer (generation)."""
    if batch.gold is not None:
        return F.cross_entropy(option_scores(model, batch, option_ids), batch.gold)
    return -target_logprobs(model, batch).mean()


def quad_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Saunshi et al.'s Quad objective on logits ``z = Phi^T f(s)`` (``(rows, [L,] V)``) and next
    words ``targets`` (``(rows, [L])``, -100 = ignore): per position ``-z_w + 1/2 ||z||^2``
    (``-f(s)^T phi_w + 1/2 ||Phi^T f(s)||^2``), averaged over each row's positions, then over rows
    (as :func:`loss` reduces the cross-entropy). Its minimiser over z is ``p*(s)`` itself."""
    if targets.dim() == 1:
        logits, targets = logits[:, None], targets[:, None]
    valid = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per = -picked + 0.5 * logits.pow(2).sum(-1)
    return ((per * valid).sum(-1) / valid.sum(-1)).mean()


def quad(model: nn.Module, batch: ModelBatch, option_ids: list[list[int]]) -> Tensor:
    """:func:`quad_loss` of the batch's next words: the answer tokens (generation, language
    modelling) or the gold label word (classification with single-token label words)."""
    if batch.gold is None:
        assert batch.labels is not None
        span = batch.labels.shape[1]
        return quad_loss(_last_logits(model, batch, span + 1)[:, :-1], batch.labels)
    if batch.labels is not None:
        raise FtlabError("objective quad needs single-token label words (it scores the next word); "
                         "pick options that are one token each, or objective=loss")
    words = torch.tensor([option_ids[g][0] for g in batch.gold.tolist()], device=batch.gold.device)
    return quad_loss(_last_logits(model, batch, 1)[:, -1], words)


def doubled(batch: ModelBatch) -> ModelBatch:
    """``batch`` concatenated with itself along the rows (for lockstep forwards)."""
    return batch.map_tensors(lambda t: torch.cat([t, t]))


def lockstep_loss(model: nn.Module, batch: ModelBatch, option_ids: list[list[int]]) -> Tensor:
    """:func:`loss` of each half of a :func:`doubled` batch, ``tensor([first, second])``, from
    one forward (offloaded MeZO runs the halves at theta + eps z and theta - eps z). Each half
    reduces exactly as :func:`loss` does on the single batch."""
    if batch.gold is not None:
        scores, half = option_scores(model, batch, option_ids), batch.gold.shape[0] // 2
        return torch.stack([F.cross_entropy(scores[:half], batch.gold[:half]),
                            F.cross_entropy(scores[half:], batch.gold[half:])])
    logp = target_logprobs(model, batch)
    half = logp.shape[0] // 2
    return torch.stack([-logp[:half].mean(), -logp[half:].mean()])


@torch.no_grad()
def greedy_decode(model: nn.Module, tokenizer, batch: ModelBatch, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each left-padded prompt, cut at the first newline or EOS."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=True, logits_to_keep=1)
    mask, pos, cache = batch.attention_mask, batch.position_ids[:, -1:], out.past_key_values
    tokens = [out.logits[:, -1].argmax(-1)]
    done = tokens[0] == tokenizer.eos_token_id
    for _ in range(max_new_tokens - 1):
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(out.logits[:, -1].argmax(-1))
        done |= tokens[-1] == tokenizer.eos_token_id
        # A newline is a byte of its own, so decoding the newest token alone is enough to see it.
        newest = tokenizer.batch_decode(tokens[-1][:, None])
        done |= torch.tensor([ANSWER_END in t for t in newest], device=done.device)
    texts = tokenizer.batch_decode(torch.stack(tokens, 1), skip_special_tokens=True)
    return [t.split(ANSWER_END)[0].strip() for t in texts]


def training_batch(encoder: Encoder, examples: Sequence[Example]) -> ModelBatch:
    """The batch the loss needs: every option (classification) or the gold answers."""
    prompts = [encoder.spec.prompt(ex) for ex in examples]
    if encoder.spec.kind == "classification":
        return encoder.classification(examples, prompts)
    return encoder.generation(prompts, [encoder.spec.target(ex) for ex in examples])


def objective_fn(name: str, model: nn.Module, tokenizer, encoder: Encoder, examples: Sequence[Example],
                 device: torch.device, lockstep: bool = False) -> Callable[[], Tensor]:
    """A function of no arguments returning what training minimises on ``examples``:
    ``"loss"`` (see :func:`loss`), or minus the batch ``"accuracy"`` (classification) or
    ``"f1"`` (generation, greedy decoding) -- non-differentiable, for zeroth-order optimizers.
    ``lockstep=True`` (``"loss"`` only): the two half losses of the doubled batch, see
    :func:`lockstep_loss` (the closure :class:`ftlab.zo.offload.OffloadedMeZO` takes)."""
    spec = encoder.spec
    if lockstep:
        if name != "loss":
            raise FtlabError(f"offloaded (lockstep) training supports objective loss only, not {name!r}")
        batch = doubled(training_batch(encoder, examples)).to(device)
        return lambda: lockstep_loss(model, batch, encoder.option_ids)
    if name == "loss":
        batch = training_batch(encoder, examples).to(device)
        return lambda: loss(model, batch, encoder.option_ids)
    if name == "quad":
        batch = training_batch(encoder, examples).to(device)
        return lambda: quad(model, batch, encoder.option_ids)
    if name == "accuracy" and spec.kind == "classification":
        batch = encoder.classification(examples, [spec.prompt(ex) for ex in examples]).to(device)
        return lambda: -(option_scores(model, batch, encoder.option_ids).argmax(-1) == batch.gold).double().mean()
    if name == "f1" and spec.kind == "generation":
        batch = encoder.generation([spec.prompt(ex) for ex in examples],
                                   max_new_tokens=spec.max_new_tokens).to(device)

        def minus_f1() -> Tensor:
            predictions = greedy_decode(model, tokenizer, batch, spec.max_new_tokens)
            return -torch.tensor([best_over_answers(f1_score, p, ex.answers)
                                  for p, ex in zip(predictions, examples)], dtype=torch.float64).mean()
        return minus_f1
    raise FtlabError(f"objective {name!r} does not fit {spec.kind} task {spec.name!r}; choose loss, quad, "
                     f"or {'accuracy' if spec.kind == 'classification' else 'f1'}")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, articles or extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 between normalised prediction and gold (official SQuAD v1.1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_over_answers(metric, prediction: str, answers: Sequence[str]) -> float:
    """SQuAD scores a prediction against its best-matching gold answer."""
    return max(metric(prediction, a) for a in answers)
