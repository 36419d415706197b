"""Tasks from your own data: local ``.jsonl`` / ``.csv`` files and Hugging Face datasets.

A row needs every field the template names (``{text}`` -> ``text``) plus, for
classification, a label and, for generation (``metric="f1"``), its gold answers. A label may
be an option index (``1`` or ``"1"``), one of ``label_names`` or an option with its
whitespace stripped (``"great"`` for ``" great"``): exactly, or else case-insensitively when
that names one label only (options ``" Great"`` and ``" great"`` need the exact word). Every problem is an
:class:`FtlabError` naming the file, line and field. Loading writes nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ftlab.errors import FtlabError
from ftlab.tasks.base import Example, TaskSpec

SUFFIXES = (".jsonl", ".csv")
Row = tuple[str, Mapping[str, Any]]  # (where, e.g. "data.jsonl:3", the row's fields)


class LabelParser:
    """Turns the label forms a user may write into an index into ``spec.options``."""

    def __init__(self, spec: TaskSpec, label_names: list[str] | None) -> None:
        n = len(spec.options)
        if label_names is not None and len(label_names) != n:
            raise FtlabError(f"task {spec.name!r}: {len(label_names)} label_names {label_names} "
                             f"for {n} options {spec.options}")
        self._n = n
        # Exact words first (whitespace stripped); label_names win over option words.
        self._by_name: dict[str, int] = {o.strip(): i for i, o in enumerate(spec.options)}
        self._by_name.update({name.strip(): i for i, name in enumerate(label_names or [])})
        # Then case-insensitive matches, for words whose lower case names a single label.
        by_lower: dict[str, set[int]] = {}
        for word, i in self._by_name.items():
            by_lower.setdefault(word.lower(), set()).add(i)
        self._by_lower = {w: next(iter(ix)) for w, ix in by_lower.items() if len(ix) == 1}
        self._ambiguous = {w: sorted(ix) for w, ix in by_lower.items() if len(ix) > 1}
        self._words = [o.strip() for o in (label_names or spec.options)]
        self._valid = f"0..{n - 1}, " + ", ".join(repr(name) for name in self._by_name)

    def __call__(self, value: Any, where: str, field: str) -> int:
        index: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            index = value
        elif isinstance(value, str) and value.strip().isdigit():
            index = int(value.strip())
        elif isinstance(value, str):
            word = value.strip()
            index = self._by_name.get(word)
            if index is None and word.lower() in self._ambiguous:
                which = " and ".join(repr(self._words[i]) for i in self._ambiguous[word.lower()])
                raise FtlabError(f"{where}: field {field!r}: label {value!r} could be {which}, which differ "
                                 "only in case; write the label exactly as the option (or its index)")
            if index is None:
                index = self._by_lower.get(word.lower())
        if index is None or not 0 <= index < self._n:
            raise FtlabError(f"{where}: field {field!r}: label {value!r} is not recognised; "
                             f"valid labels: {self._valid}")
        return index


def load_file(path: str | Path, spec: TaskSpec, *, label_field: str = "label",
              answers_field: str = "answers", label_names: list[str] | None = None) -> list[Example]:
    """The examples of a ``.jsonl`` (one JSON object a line) or ``.csv`` (with header) file.

    Example ids are ``"<file name>:<row index>"``; ``source`` is ``"<path>:<line>"``.

    Raises:
        FtlabError: file not found, unsupported extension, invalid JSON line, missing field,
            unrecognised label or answers, no examples.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise FtlabError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                         f"use {' or '.join(SUFFIXES)}")
    if not path.is_file():
        raise FtlabError(f"{path}: file not found")
    rows = jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _csv_rows(path)
    examples = to_examples(rows, spec, id_prefix=path.name, label_field=label_field,
                           answers_field=answers_field, label_names=label_names)
    if not examples:
        raise FtlabError(f"{path}: no examples (the file has no data rows)")
    return examples


def load_hf(name: str, spec: TaskSpec, *, split: str, config: str | None = None,
            label_field: str = "label", answers_field: str = "answers",
            label_names: list[str] | None = None) -> list[Example]:
    """The examples of split ``split`` of Hugging Face dataset ``name`` (``datasets.load_dataset``).

    Rows are handled exactly as in :func:`load_file`; ``source`` is ``"hf:<name>[<split>]:<row>"``.
    Only datasets already in the local Hugging Face cache (or local folders) load offline.
    """
    try:
        import datasets
    except ImportError as e:
        raise FtlabError(f"hf:{name}: the 'datasets' package is not installed; "
                         "pip install 'ftlab[hub]'") from e
    where = f"hf:{name}[{split}]"
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub, file system and builder errors have no common base
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FtlabError(f"{where}: could not load the dataset: {first}") from e
    rows = ((f"{where}:{i}", row) for i, row in enumerate(dataset))
    examples = to_examples(rows, spec, id_prefix=name, label_field=label_field,
                           answers_field=answers_field, label_names=label_names)
    if not examples:
        raise FtlabError(f"{where}: no examples (the split is empty)")
    return examples


def to_examples(rows: Iterable[Row], spec: TaskSpec, *, id_prefix: str, label_field: str = "label",
                answers_field: str = "answers", label_names: list[str] | None = None) -> list[Example]:
    """Validate raw rows against ``spec`` and turn them into examples (shared by every loader)."""
    needed = sorted(spec.placeholders())
    parse_label = LabelParser(spec, label_names) if spec.kind == "classification" else None
    examples = []
    for i, (where, row) in enumerate(rows):
        fields = {name: _text(_field(row, name, where), where, name) for name in needed}
        if parse_label is not None:
            label, answers = parse_label(_field(row, label_field, where), where, label_field), ()
        else:
            label, answers = None, _answers(_field(row, answers_field, where), where, answers_field)
        examples.append(Example(id=f"{id_prefix}:{i}", fields=fields, label=label,
                                answers=answers, source=where))
    return examples


def _field(row: Mapping[str, Any], name: str, where: str) -> Any:
    value = row.get(name)
    if value is None and name in row:
        raise FtlabError(f"{where}: field {name!r} is null; give it a value (or drop the row)")
    if value is None:
        present = ", ".join(repr(k) for k in row if k is not None) or "none"
        raise FtlabError(f"{where}: missing field {name!r} (fields present: {present})")
    return value


def _text(value: Any, where: str, name: str) -> str:
    if isinstance(value, (dict, list)):
        raise FtlabError(f"{where}: field {name!r} must be text, not {type(value).__name__}")
    return str(value)


def _answers(value: Any, where: str, name: str) -> tuple[str, ...]:
    """Gold answers from a string, a list of strings, or SQuAD-style ``{"text": [...]}``."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(a, str) and a.strip() for a in value)):
        raise FtlabError(f"{where}: field {name!r} must be a non-empty answer string, a list of them, "
                         f"or {{'text': [...]}}; got {value!r}")
    return tuple(a.strip() for a in value)


def jsonl_rows(path: Path) -> Iterator[Row]:
    """``("<path>:<line>", object)`` for each non-blank line of a JSONL file; a line that is not
    a JSON object is a one-line error naming its file and line."""
    for line_no, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise FtlabError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise FtlabError(f"{where}: expected a JSON object with fields, got {type(row).__name__}")
        yield where, row


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = csv.DictReader(_lines(path))
    try:
        for row in reader:  # a short row's missing cells are None: drop them (missing, not null)
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v is not None}
    except csv.Error as e:
        raise FtlabError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None


def _lines(path: Path) -> Iterator[str]:
    """The file's lines (newlines kept), decoded one by one so a bad byte gets its line number."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on line 1: tolerate the byte-order mark spreadsheet exports add
                yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise FtlabError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
