"""Instruction examples for data selection: loading and tokenising with a response-only loss
(the real pool and its held-out target sets are built by :mod:`ftlab.select.pool`).

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ftlab.errors import FtlabError
from ftlab.objectives import CHARS_PER_TOKEN_BOUND, ModelBatch, prompt_ids
from ftlab.tasks.files import jsonl_rows


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
    return ModelBatch.left_padded([row for row, _ in rows], pad_id, targets=[row[len(row) - n:] for row, n in rows])
