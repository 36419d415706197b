"""Parsers of the built-in tasks' source files (see :mod:`ftlab.tasks.sources`): one file's bytes
in, :class:`Example` objects out, with stable ids ``"<task>:<key>"`` (the file's own id column or
the 1-based line) and ``source`` = ``"<file name>:<line>"``.

Every parser refuses a row it cannot read with one line naming the file, line and field; rows that
are not labelled examples by the task's definition (a neutral rating, an unlabelled BoolQ question,
an unanswerable Disfl-QA question) are skipped, and so are repeats of an earlier row's text (a
repeat could land in both train and test).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ftlab.errors import FtlabError
from ftlab.tasks.base import Example
from ftlab.tasks.files import jsonl_rows

Parser = Callable[[Sequence[Path]], list[Example]]

# Entailment vs not: one template and one pair of label words for every binary entailment task, so a
# model trained on one is evaluated on the others with the same prompt. Label 0: entailment, 1: not.
ENTAILMENT_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?\nAnswer:"
ENTAILMENT_OPTIONS = (" Yes", " No")
#: TREC's six coarse question types, in label order, and the word each is asked as.
TREC_TYPES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_OPTIONS = (" abbreviation", " description", " entity", " person", " location", " number")
LETTERS = "ABCDEFGH"


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FtlabError(f"{path}: not UTF-8 text ({e}); run `ftlab data prepare` to re-extract it") from e


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line, object) for every non-blank line (errors name the file and line)."""
    for where, row in jsonl_rows(path):
        yield int(where.rpartition(":")[2]), row


def _field(row: dict[str, Any], name: str, where: str, kind: type = str) -> Any:
    value = row.get(name)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise FtlabError(f"{where}: field {name!r} is missing or not a non-empty {kind.__name__}")
    return value


# -- sentiment: Hutto & Gilbert's ground truth (id, mean rating -4..4, text) -----------------------
def ratings(name: str) -> Parser:
    """Sentences with a mean human rating: positive (1) above 0, negative (0) below, 0 dropped."""
    def parse(paths: Sequence[Path]) -> list[Example]:
        (path,) = paths
        lines = _text(path).splitlines()
        if not lines or lines[0].strip().split("\t") != ["id", "sentiment", "text"]:
            raise FtlabError(f"{path.name}:1: expected the header 'id<TAB>sentiment<TAB>text'")
        seen: set[str] = set()
        out = []
        for line_no, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            parts = line.rstrip("\r").split("\t")
            where = f"{path.name}:{line_no}"
            if len(parts) != 3:
                raise FtlabError(f"{where}: expected 3 tab-separated fields (id, sentiment, text), got {len(parts)}")
            key, rating, text = parts[0].strip(), parts[1], parts[2].strip()
            try:
                value = float(rating)
            except ValueError:
                raise FtlabError(f"{where}: field 'sentiment' is not a number: {rating!r}") from None
            if value == 0 or not text or text in seen:
                continue
            seen.add(text)
            out.append(Example(id=f"{name}:{key}", fields={"text": text}, label=int(value > 0), source=where))
        return out
    return parse


# -- TREC question types ("DESC:manner How did ...") -----------------------------------------------
_TREC_LINE = re.compile(r"\A(?P<coarse>[A-Z]+):(?P<fine>\S+) (?P<question>.+)\Z")


def trec(paths: Sequence[Path]) -> list[Example]:
    """Questions labelled with one of :data:`TREC_TYPES`; the file repeats rows, kept once."""
    (path,) = paths
    seen: set[str] = set()
    out = []
    for line_no, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{line_no}"
        match = _TREC_LINE.match(line.strip())
        if match is None or match["coarse"] not in TREC_TYPES:
            raise FtlabError(f"{where}: expected '<TYPE>:<subtype> <question>' with TYPE one of "
                             f"{', '.join(TREC_TYPES)}, got {line.strip()[:60]!r}")
        question = match["question"].strip()
        if question in seen:
            continue
        seen.add(question)
        out.append(Example(id=f"trec:{line_no}", fields={"question": question},
                           label=TREC_TYPES.index(match["coarse"]), source=where))
    return out


# -- BoolQ ------------------------------------------------------------------------------------------
def boolq(paths: Sequence[Path]) -> list[Example]:
    """Yes/no questions about a Wikipedia passage (label 1: yes); rows without a label are skipped."""
    (path,) = paths
    seen: set[tuple[str, str]] = set()
    out = []
    for line_no, row in _jsonl(path):
        where = f"{path.name}:{line_no}"
        if "label" not in row:
            continue  # the unlabelled test part
        label = row["label"]
        if not isinstance(label, bool):
            raise FtlabError(f"{where}: field 'label' is not true/false: {label!r}")
        question, passage = _field(row, "question", where).strip(), _field(row, "passage", where).strip()
        if (question, passage) in seen:
            continue
        seen.add((question, passage))
        out.append(Example(id=f"boolq:{line_no}", fields={"question": question, "passage": passage},
                           label=int(label), source=where))
    return out


# -- multiple choice ("A. ...\nB. ..." with the answer "B. ...") ------------------------------------
_CHOICE = re.compile(r"\A([A-H])\.\s?(.*)\Z", re.DOTALL)


def choices(name: str, n: int, *, passage: bool = False, damaged: Sequence[int] = ()) -> Parser:
    """Multiple choice with ``n`` lettered options: the fields are ``question``, ``choices`` (one
    ``"A. ..."`` line each) and, with ``passage``, the context; the label is the letter's index.
    ``damaged``: 1-based lines of the pinned file whose options are cut apart (skipped)."""
    def parse(paths: Sequence[Path]) -> list[Example]:
        (path,) = paths
        seen: set[tuple[str, ...]] = set()
        out = []
        for line_no, row in _jsonl(path):
            where = f"{path.name}:{line_no}"
            if line_no in damaged:
                continue
            options = _options(_field(row, "options", where), n, where)
            answer = _CHOICE.match(_field(row, "answer", where).strip())
            # (a few CommonsenseQA rows carry the question's "?" on their last option)
            if answer is None or LETTERS.index(answer[1]) >= n \
                    or options[LETTERS.index(answer[1])].rstrip("?") != answer[2].strip().rstrip("?"):
                raise FtlabError(f"{where}: field 'answer' {row['answer'][:40]!r} is not one of its options")
            fields = {"question": _field(row, "question", where).strip(),
                      "choices": "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))}
            if passage:
                fields["passage"] = _field(row, "passage", where).strip()
            key = tuple(fields.values())
            if key in seen:
                continue
            seen.add(key)
            out.append(Example(id=f"{name}:{line_no}", fields=fields, label=LETTERS.index(answer[1]), source=where))
        return out
    return parse


def _options(text: str, n: int, where: str) -> list[str]:
    """The ``n`` option texts of ``"A. x\\nB. y"``, in letter order."""
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip() and ln.strip() != "."]
    parsed = [_CHOICE.match(ln) for ln in lines]
    if len(lines) != n or any(m is None or m[1] != LETTERS[i] for i, m in enumerate(parsed)):
        raise FtlabError(f"{where}: field 'options' is not {n} lines 'A. ...' to '{LETTERS[n - 1]}. ...'")
    return [m[2].strip() for m in parsed]  # type: ignore[index]


# -- Disfl-QA: SQuAD v2 passages, disfluent questions, the answer a span of the passage --------------
def _squashed(text: str) -> str:
    """Lower case without whitespace: the passages are tokenised ("Earth ' s"), answers not always."""
    return re.sub(r"\s+", "", text.lower())


def disflqa(paths: Sequence[Path]) -> list[Example]:
    """The answerable questions (the answer, case and spacing aside, is a span of the passage);
    ``"unknown"`` (unanswerable) questions are skipped, any other non-span is refused."""
    (path,) = paths
    out = []
    for line_no, row in _jsonl(path):
        where = f"{path.name}:{line_no}"
        answer = _field(row, "answer", where).strip()
        if answer.lower() == "unknown":
            continue
        context = _field(row, "passage", where).strip()
        if _squashed(answer) not in _squashed(context):
            raise FtlabError(f"{where}: field 'answer' {answer[:40]!r} is not a span of the passage")
        out.append(Example(id=f"disflqa:{line_no}", answers=(answer,), source=where,
                           fields={"context": context, "question": _field(row, "question", where).strip()}))
    return out


# -- entailment ------------------------------------------------------------------------------------
def factual_summary(paths: Sequence[Path]) -> list[Example]:
    """Each row is two pairs: the article sentence entails its faithful summary (label 0) and not
    its unfaithful one (label 1)."""
    (path,) = paths
    out = []
    for line_no, row in _jsonl(path):
        where = f"{path.name}:{line_no}"
        premise = _field(row, "article_sent", where).strip()
        for label, (key, fieldname) in enumerate((("c", "correct_sent"), ("i", "incorrect_sent"))):
            out.append(Example(id=f"factual_summary:{line_no}{key}", label=label, source=where,
                               fields={"premise": premise, "hypothesis": _field(row, fieldname, where).strip()}))
    return out


_C2C_INPUT = re.compile(r"\APremise:(?P<premise>.*?)\s*Hypothesis:(?P<hypothesis>.*)\Z", re.DOTALL)
#: corr2cause's answers in label order (the 3-way entailment order of every NLI task here).
NLI_LABELS = ("entailment", "neutral", "contradiction")


def corr2cause(binary: bool) -> Parser:
    """Causal inference from correlations (synthetic): premise and hypothesis from the user message,
    the label from ``ideal`` ("Answer: neutral"); ``binary`` gives entailment (0) vs not (1)."""
    name = "corr2cause_binary" if binary else "corr2cause"

    def parse(paths: Sequence[Path]) -> list[Example]:
        (path,) = paths
        out = []
        for line_no, row in _jsonl(path):
            where = f"{path.name}:{line_no}"
            messages = row.get("input")
            user = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"] \
                if isinstance(messages, list) else []
            parsed = _C2C_INPUT.match(user[-1].strip()) if user and isinstance(user[-1], str) else None
            ideal = str(row.get("ideal", "")).strip().removeprefix("Answer:").strip().lower()
            if parsed is None:
                raise FtlabError(f"{where}: field 'input' has no user message 'Premise: ... Hypothesis: ...'")
            if ideal not in NLI_LABELS:
                raise FtlabError(f"{where}: field 'ideal' is not 'Answer: <{'|'.join(NLI_LABELS)}>'")
            label = NLI_LABELS.index(ideal)
            out.append(Example(id=f"{name}:{line_no}", fields={k: v.strip() for k, v in parsed.groupdict().items()},
                               label=int(label != 0) if binary else label, source=where))
        return out
    return parse
