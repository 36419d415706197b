"""Instruction examples for data selection: loading, tokenising with a response-only loss, and
the real BIG-bench pool and target sets.

An example is one line of a JSONL file, either ``{"messages": [{"role", "content"}, ...]}``
(the last message is the assistant's response) or ``{"prompt": ..., "response": ...}``; an
optional ``"task"`` names its subtask (target examples are grouped by it when scoring) and an
optional ``"family"`` the task family it belongs to (for reports). Ids are ``"<file>:<line>"``
with the file as given and 1-based lines, so examples of several files never collide.

Batches use the :class:`ftlab.objectives.ModelBatch` layout (left-padded, labels right-aligned
over the response), so the per-example loss is :func:`ftlab.objectives.target_logprobs`:
the mean log-probability of the response tokens only.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ftlab.errors import FtlabError
from ftlab.io import atomic_file
from ftlab.objectives import CHARS_PER_TOKEN_BOUND, ModelBatch, prompt_ids
from ftlab.tasks.files import jsonl_rows

#: The registered BIG-bench tasks added to the pool beside ``natural_instructions`` (task -> family).
OTHER_BIGBENCH_TASKS = ("strategyqa", "nli", "sentiment")
_NI_DIR = "natural_instructions"
# Subtask name words that spell one family in several ways.
_FAMILY_ALIASES = {"miscellaneous": "misc", "miscellaenous": "misc", "essential": "essential_terms"}


@dataclass(frozen=True)
class InstructionExample:
    """One instruction example.

    Attributes:
        id: ``"<file>:<line>"`` (unique across the files of a pool).
        messages: the conversation before the response, as ``{"role", "content"}`` dicts.
        response: the assistant's answer; the only tokens the loss is taken on.
        task: the subtask it belongs to (the file name when the line names none).
        family: the task family (defaults to ``task``).
    """

    id: str
    messages: tuple[dict[str, str], ...]
    response: str
    task: str
    family: str

    @property
    def source(self) -> tuple[str, int]:
        """The file and 1-based line the example was read from."""
        path, _, line = self.id.rpartition(":")
        return path, int(line)


def _parse(row: dict[str, Any], where: str, default_task: str) -> tuple[tuple[dict[str, str], ...], str, str, str]:
    """(messages, response, task, family) of one JSONL row, or a one-line error naming ``where``."""
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)
        if not ok or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise FtlabError(f"{where}: 'messages' must be a list of {{'role', 'content'}} strings ending "
                             "with the assistant's response after at least one other message")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:-1])
        response = msgs[-1]["content"]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        messages, response = ({"role": "user", "content": row["prompt"]},), row["response"]
    else:
        raise FtlabError(f"{where}: needs 'messages' or string fields 'prompt' and 'response'")
    task = str(row.get("task", default_task))
    return messages, response, task, str(row.get("family", task))


def load_instructions(paths: Sequence[str | Path]) -> list[InstructionExample]:
    """Read instruction examples from one or more JSONL files (blank lines skipped).

    Raises:
        FtlabError: for a missing file, a bad line (named by file and line), no examples, or a
            file given twice.
    """
    if not paths:
        raise FtlabError("no instruction files given; pass at least one .jsonl file")
    if len({str(p) for p in paths}) != len(paths):
        raise FtlabError(f"instruction files {list(map(str, paths))} name a file twice")
    examples = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FtlabError(f"instruction file {path} not found")
        for where, row in jsonl_rows(path):
            messages, response, task, family = _parse(row, where, path.stem)
            examples.append(InstructionExample(where, messages, response, task, family))
    if not examples:
        raise FtlabError(f"no examples in {', '.join(map(str, paths))}")
    return examples


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text before the response: the tokenizer's chat template with the generation prompt,
    or, for a tokenizer without one, the message contents joined by newlines plus a newline."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def _head_ids(tokenizer: Any, text: str, keep: int) -> list[int]:
    """Token ids of ``text``, of which only the first ``keep`` will be used: a long text is cut
    (as text) before it is tokenised, so a huge response costs what ``keep`` tokens cost."""
    window = max(1, keep) * CHARS_PER_TOKEN_BOUND
    while len(text) > window:
        ids = tokenizer(text[:window], add_special_tokens=False)["input_ids"]
        if len(ids) > keep + 1:  # the last, possibly cut, token lies beyond what is kept
            return ids
        window *= 4
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer: Any, example: InstructionExample, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ EOS) and the number of response tokens at the end.

    The response keeps at most ``max_length // 2`` tokens and the prompt is cut from the left
    to fit (the query sits at its end). An empty response has no target tokens (count 0).
    """
    if max_length < 2:
        raise FtlabError(f"max_length must be >= 2, got {max_length}")
    response = _head_ids(tokenizer, example.response, max_length // 2) if example.response else []
    if response and tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    response = response[:max_length // 2]
    # Chat templates already hold the special tokens they need; plain text gets the BOS the
    # tokenizer itself prepends (Gemma without <bos> gives a loss several times too high).
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt = prompt_ids(tokenizer, render_prompt(tokenizer, example.messages), max_length - len(response),
                        special_tokens=not templated)
    return prompt + response, len(response)


def collate(rows: Sequence[tuple[list[int], int]], pad_id: int) -> ModelBatch:
    """Left-padded :class:`ModelBatch` of encoded examples, labels on the response tokens only.

    Every row needs at least one response token (the mean over none is undefined)."""
    if any(n < 1 for _, n in rows):
        raise FtlabError("collate: an example has no response tokens; drop it first")
    ids, mask, positions = pad_left([row for row, _ in rows], pad_id)
    span = max(n for _, n in rows)
    labels = torch.full((len(rows), span), -100, dtype=torch.long)
    for i, (row, n) in enumerate(rows):
        labels[i, span - n:] = torch.tensor(row[len(row) - n:])
    return ModelBatch(ids, mask, positions, labels, n_options=1, gold=None)


def pad_left(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of token sequences, left-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (EOS when it has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# The real pool: BIG-bench natural_instructions subtasks plus a few registered BIG-bench tasks.


@dataclass
class PoolSpec:
    """How the BIG-bench pool and target sets are drawn.

    Attributes:
        per_task: pool examples drawn from each subtask (fewer if it has fewer).
        n_target: examples per subtask held out for the target sets (never in the pool).
        max_chars: skip examples whose prompt + response is longer (keeps sequences short).
        other_tasks: registered BIG-bench tasks added as their own families.
        seed: seed of the draws.
    """

    per_task: int = 40
    n_target: int = 4
    max_chars: int = 1000
    other_tasks: list[str] = field(default_factory=lambda: list(OTHER_BIGBENCH_TASKS))
    seed: int = 0


def subtask_family(subtask: str) -> str:
    """The family of a natural_instructions subtask (``subtask002_quoref_answer_generation`` ->
    ``quoref``): the source data set it was built from."""
    m = re.match(r"subtask\d+_([a-z]+)", subtask)
    if not m:
        raise FtlabError(f"{subtask!r} is not a natural_instructions subtask name (subtaskNNN_<dataset>_...)")
    return _FAMILY_ALIASES.get(m.group(1), m.group(1))


def _definition(task_prefix: str) -> str:
    """The first sentence of a natural_instructions definition: a short instruction."""
    text = task_prefix.removeprefix("Definition:").strip()
    return re.split(r"(?<=[.?!])\s", text, maxsplit=1)[0]


def _natural_instruction_rows() -> dict[str, list[dict[str, str]]]:
    """Rows of every extracted natural_instructions subtask, by subtask name."""
    from ftlab.tasks.bigbench import data_root

    root = data_root() / _NI_DIR
    files = sorted(root.glob("*/task.json"))
    if not files:
        raise FtlabError(f"no natural_instructions subtasks in {root}; run `ftlab data prepare` first")
    out = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        instruction = _definition(data.get("task_prefix", ""))
        rows = []
        for ex in data["examples"]:
            target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
            rows.append({"prompt": f"{instruction}\n\n{ex['input'].strip()}", "response": target.strip()})
        out[path.parent.name] = rows
    return out


def _registered_rows(name: str) -> list[dict[str, str]]:
    """Rows of a registered BIG-bench task: its prompt, and the gold label word or answer."""
    from ftlab.tasks import load_task

    spec, examples = load_task(name)
    return [{"prompt": spec.prompt(ex).strip(), "response": spec.target(ex).strip()} for ex in examples]


def build_bigbench_pool(out_dir: str | Path, spec: PoolSpec | None = None) -> dict[str, Path]:
    """Write ``pool.jsonl`` and ``targets/<family>.jsonl`` under ``out_dir`` from BIG-bench.

    Each subtask contributes ``per_task`` pool examples and ``n_target`` different held-out
    target examples, drawn without replacement with ``seed``; every row records its ``task``
    (subtask) and ``family``. Files are written atomically. Returns ``{"pool": path,
    <family>: target path, ...}``.
    """
    spec = spec or PoolSpec()
    rng = random.Random(spec.seed)
    sources = {name: (subtask_family(name), rows) for name, rows in _natural_instruction_rows().items()}
    sources.update({name: (name, _registered_rows(name)) for name in spec.other_tasks})
    pool, targets = [], {}
    for name, (family, rows) in sorted(sources.items()):
        fits = [r for r in rows if r["response"] and len(r["prompt"]) + len(r["response"]) <= spec.max_chars]
        drawn = rng.sample(fits, min(len(fits), spec.per_task + spec.n_target))
        tag = {"task": name, "family": family}
        targets.setdefault(family, []).extend({**r, **tag} for r in drawn[:spec.n_target])
        pool.extend({**r, **tag} for r in drawn[spec.n_target:])
    out_dir = Path(out_dir)
    paths = {"pool": out_dir / "pool.jsonl"}
    paths.update({family: out_dir / "targets" / f"{family}.jsonl" for family in sorted(targets)})
    for key, rows in [("pool", pool), *sorted(targets.items())]:
        with atomic_file(paths[key]) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return paths
