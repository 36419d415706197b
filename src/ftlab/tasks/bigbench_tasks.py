"""The BIG-bench tasks' loaders (an optional source: ``bigbench==1.0.0`` is no longer served by
PyPI, so they need the archive, ``ftlab data prepare --tarball PATH``).

Each loader turns one extracted BIG-bench file (see :mod:`ftlab.tasks.bigbench`) into
:class:`Example` objects with stable ids ``"<task>:<index>"``, where the index is the example's
position in the source file (so ids survive filtering).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Iterator, Sequence

from ftlab.errors import FtlabError
from ftlab.tasks.base import Example
from ftlab.tasks.bigbench import bigbench_file

SENTIMENT_FILE = "multiemo/all_sentence_en/task.json"
STRATEGYQA_FILE = "strategyqa/task.json"
NLI_FILE = "presuppositions_as_nli/task.json"
SQUAD_FILE = "squad_shifts/squaddev_v1.1.json"
EPISTEMIC_FILE = "epistemic_reasoning/task.json"
ANALYTIC_FILE = "analytic_entailment/task.json"

# epistemic_reasoning inputs are "Premise: <premise> Hypothesis: <hypothesis>"; analytic_entailment
# inputs are "<premise>. So[,] <hypothesis>" or "<premise>. Therefore <hypothesis>".
EPISTEMIC_INPUT = re.compile(r"\APremise:(?P<premise>.*?)\s*Hypothesis:(?P<hypothesis>.*)\Z", re.DOTALL)
ANALYTIC_INPUT = re.compile(r"\A(?P<premise>.+?[.!?])\s+(?:So,?|Therefore)\s+(?P<hypothesis>.+)\Z", re.DOTALL)

# presuppositions_as_nli inputs are "Sentence 1: <premise> \nSentence 2: <hypothesis>\n\nThe answer is: ".
_NLI_INPUT = re.compile(r"\ASentence 1:(?P<premise>.*?)\nSentence 2:(?P<hypothesis>.*?)\n\nThe answer is:\s*\Z",
                        re.DOTALL)


def _read_json(rel: str) -> Any:
    path = bigbench_file(rel)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FtlabError(f"{path}: not valid JSON ({e}); run `ftlab data prepare` to repair it") from e


def _bigbench_examples(rel: str) -> list[dict]:
    """The ``examples`` list of a BIG-bench ``task.json``."""
    data = _read_json(rel)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise FtlabError(f"{bigbench_file(rel)}: expected a BIG-bench task.json with an 'examples' list")
    return data["examples"]


def _gold(example: dict, labels: Sequence[str], where: str) -> int | None:
    """Index in ``labels`` of the best-scored target, or None when that target is not in ``labels``."""
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise FtlabError(f"{where}: field 'target_scores' is missing or empty")
    best = max(scores, key=scores.__getitem__)
    return labels.index(best) if best in labels else None


def load_multiemo() -> list[Example]:
    """Positive and negative review sentences; neutral, ambivalent, empty and repeated ones are
    dropped (a repeat could land in both train and test)."""
    seen: set[str] = set()
    out = []
    for i, ex in enumerate(_bigbench_examples(SENTIMENT_FILE)):
        where = f"{SENTIMENT_FILE}:{i}"
        label = _gold(ex, ("negative", "positive"), where)
        text = str(ex.get("input", "")).strip()
        if label is None or not text or text in seen:
            continue
        seen.add(text)
        out.append(Example(id=f"multiemo:{i}", fields={"text": text}, label=label, source=where))
    return out


def load_strategyqa() -> list[Example]:
    out = []
    for i, ex in enumerate(_bigbench_examples(STRATEGYQA_FILE)):
        where = f"{STRATEGYQA_FILE}:{i}"
        label = _gold(ex, ("No", "Yes"), where)
        if label is None:
            raise FtlabError(f"{where}: field 'target_scores' has no 'Yes'/'No' answer")
        out.append(Example(id=f"strategyqa:{i}", fields={"question": str(ex["input"]).strip()},
                           label=label, source=where))
    return out


def load_nli() -> list[Example]:
    out = []
    for i, ex in enumerate(_bigbench_examples(NLI_FILE)):
        where = f"{NLI_FILE}:{i}"
        parsed = _NLI_INPUT.match(str(ex.get("input", "")))
        label = _gold(ex, ("entailment", "neutral", "contradiction"), where)
        if parsed is None or label is None:
            raise FtlabError(f"{where}: field 'input' is not 'Sentence 1: ... Sentence 2: ...' "
                             "or 'target_scores' is not entailment/neutral/contradiction")
        fields = {k: v.strip() for k, v in parsed.groupdict().items()}
        out.append(Example(id=f"nli:{i}", fields=fields, label=label, source=where))
    return out


def load_nli_binary() -> list[Example]:
    """presuppositions_as_nli as entailment (0) vs not entailment (1: neutral or contradiction)."""
    return [dataclasses.replace(ex, id=f"nli_binary:{ex.id.split(':')[1]}", label=int(ex.label != 0))
            for ex in load_nli()]


def entailment_loader(rel: str, name: str, pattern: re.Pattern, labels: tuple[str, str]
                       ) -> Callable[[], list[Example]]:
    """Loader of a BIG-bench entailment task: ``input`` split into premise and hypothesis by
    ``pattern``, ``labels`` = (entailment word, non-entailment word) of its ``target_scores``."""
    def load() -> list[Example]:
        out = []
        for i, ex in enumerate(_bigbench_examples(rel)):
            where = f"{rel}:{i}"
            parsed = pattern.match(str(ex.get("input", "")).strip())
            label = _gold(ex, labels, where)
            if parsed is None or label is None:
                raise FtlabError(f"{where}: field 'input' does not split into premise and hypothesis "
                                 f"or 'target_scores' is not {'/'.join(labels)}")
            fields = {k: v.strip() for k, v in parsed.groupdict().items()}
            out.append(Example(id=f"{name}:{i}", fields=fields, label=label, source=where))
        return out
    return load


def _squad_questions(data: Any) -> Iterator[tuple[str, str, dict]]:
    """(title, context, qa) for every question of a SQuAD v1.1 file, in file order."""
    for article in data["data"]:
        title = article["title"].replace("_", " ")
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield title, paragraph["context"], qa


def load_squad() -> list[Example]:
    out = []
    try:
        for i, (title, context, qa) in enumerate(_squad_questions(_read_json(SQUAD_FILE))):
            # dict.fromkeys: drop repeated gold answers, keep their order (the first is the target)
            answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"]))
            out.append(Example(id=f"squad:{i}", answers=answers, source=f"{SQUAD_FILE}:{i}",
                               fields={"title": title, "context": context.strip(),
                                       "question": qa["question"].strip()}))
    except (KeyError, TypeError) as e:
        raise FtlabError(f"{bigbench_file(SQUAD_FILE)}: not in SQuAD v1.1 format (missing {e})") from e
    return out
