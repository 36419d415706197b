"""The built-in prompt-based tasks, read from the extracted BIG-bench files.

Each task is a :class:`TaskSpec` (template, label words, metric) plus a loader that turns
one BIG-bench file into :class:`Example` objects with stable ids ``"<task>:<index>"``, where
the index is the example's position in the source file (so ids survive filtering).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ftlab.errors import FtlabError
from ftlab.tasks.base import Example, TaskSpec
from ftlab.tasks.bigbench import bigbench_file

SENTIMENT_FILE = "multiemo/all_sentence_en/task.json"
STRATEGYQA_FILE = "strategyqa/task.json"
NLI_FILE = "presuppositions_as_nli/task.json"
SQUAD_FILE = "squad_shifts/squaddev_v1.1.json"
EPISTEMIC_FILE = "epistemic_reasoning/task.json"
ANALYTIC_FILE = "analytic_entailment/task.json"

# Entailment vs not (the binary NLI view of presuppositions_as_nli, and two out-of-distribution
# entailment tests): one template and one pair of label words, so a model trained on one is
# evaluated on the others with the same prompt. Label 0: entailment, 1: not entailment.
ENTAILMENT_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?\nAnswer:"
ENTAILMENT_OPTIONS = (" Yes", " No")
# epistemic_reasoning inputs are "Premise: <premise> Hypothesis: <hypothesis>"; analytic_entailment
# inputs are "<premise>. So[,] <hypothesis>" or "<premise>. Therefore <hypothesis>".
_EPISTEMIC_INPUT = re.compile(r"\APremise:(?P<premise>.*?)\s*Hypothesis:(?P<hypothesis>.*)\Z", re.DOTALL)
_ANALYTIC_INPUT = re.compile(r"\A(?P<premise>.+?[.!?])\s+(?:So,?|Therefore)\s+(?P<hypothesis>.+)\Z", re.DOTALL)

# presuppositions_as_nli inputs are "Sentence 1: <premise> \nSentence 2: <hypothesis>\n\nThe answer is: ".
_NLI_INPUT = re.compile(r"\ASentence 1:(?P<premise>.*?)\nSentence 2:(?P<hypothesis>.*?)\n\nThe answer is:\s*\Z",
                        re.DOTALL)


@dataclass(frozen=True)
class BuiltinTask:
    """A registered task: its spec, the BIG-bench files it reads, and its loader."""

    spec: TaskSpec
    files: tuple[str, ...]
    load: Callable[[], list[Example]]
    aliases: tuple[str, ...] = ()


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


def _load_sentiment() -> list[Example]:
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
        out.append(Example(id=f"sentiment:{i}", fields={"text": text}, label=label, source=where))
    return out


def _load_strategyqa() -> list[Example]:
    out = []
    for i, ex in enumerate(_bigbench_examples(STRATEGYQA_FILE)):
        where = f"{STRATEGYQA_FILE}:{i}"
        label = _gold(ex, ("No", "Yes"), where)
        if label is None:
            raise FtlabError(f"{where}: field 'target_scores' has no 'Yes'/'No' answer")
        out.append(Example(id=f"strategyqa:{i}", fields={"question": str(ex["input"]).strip()},
                           label=label, source=where))
    return out


def _load_nli() -> list[Example]:
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


def _load_nli_binary() -> list[Example]:
    """presuppositions_as_nli as entailment (0) vs not entailment (1: neutral or contradiction)."""
    return [dataclasses.replace(ex, id=f"nli_binary:{ex.id.split(':')[1]}", label=int(ex.label != 0))
            for ex in _load_nli()]


def _entailment_loader(rel: str, name: str, pattern: re.Pattern, labels: tuple[str, str]
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


def _load_squad() -> list[Example]:
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


_TASKS: tuple[BuiltinTask, ...] = (
    BuiltinTask(
        TaskSpec(name="sentiment", template="Review: {text}\nSentiment:",
                 options=[" negative", " positive"],
                 description="Positive vs negative review sentences (BIG-bench multiemo, English)"),
        (SENTIMENT_FILE,), _load_sentiment, aliases=("multiemo",)),
    BuiltinTask(
        TaskSpec(name="strategyqa", template="Question: {question}\nAnswer:", options=[" No", " Yes"],
                 description="Yes/no questions needing implicit multi-step reasoning (BIG-bench)"),
        (STRATEGYQA_FILE,), _load_strategyqa),
    BuiltinTask(
        TaskSpec(name="nli", template="{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:",
                 options=[" True", " Neither", " False"],
                 description="Entailment / neutral / contradiction (BIG-bench presuppositions_as_nli)"),
        (NLI_FILE,), _load_nli, aliases=("presuppositions_as_nli",)),
    BuiltinTask(
        TaskSpec(name="squad", template="Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
                 metric="f1", max_new_tokens=32,
                 description="Extractive QA, SQuAD v1.1 dev (BIG-bench squad_shifts); F1 and EM"),
        (SQUAD_FILE,), _load_squad, aliases=("squad_v1.1",)),
    BuiltinTask(
        TaskSpec(name="nli_binary", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                 description="Entailment vs not (neutral or contradiction), BIG-bench presuppositions_as_nli"),
        (NLI_FILE,), _load_nli_binary, aliases=("presuppositions_as_nli_binary",)),
    BuiltinTask(
        TaskSpec(name="epistemic_reasoning", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                 description="Entailment vs not, premises built from syntactic heuristics (BIG-bench; OOD NLI)"),
        (EPISTEMIC_FILE,), _entailment_loader(EPISTEMIC_FILE, "epistemic_reasoning", _EPISTEMIC_INPUT,
                                              ("entailment", "non-entailment"))),
    BuiltinTask(
        TaskSpec(name="analytic_entailment", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                 description="Entailment vs not from word meaning, 70 pairs (BIG-bench; OOD NLI)"),
        (ANALYTIC_FILE,), _entailment_loader(ANALYTIC_FILE, "analytic_entailment", _ANALYTIC_INPUT,
                                             ("entailment", "no-entailment"))),
)
_BY_NAME = {name: task for task in _TASKS for name in (task.spec.name, *task.aliases)}


def task_names() -> list[str]:
    """The built-in task names (without aliases), in registry order."""
    return [task.spec.name for task in _TASKS]


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in task or one of its aliases."""
    return name in _BY_NAME


def unknown_task(name: str) -> FtlabError:
    """The error for a task name that is neither built in nor a file."""
    return FtlabError(f"unknown task {name!r}; built-in tasks: {', '.join(task_names())} "
                      "(or give a .jsonl/.csv file or 'hf:<dataset>')")


def _lookup(name: str) -> BuiltinTask:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise unknown_task(name) from None


def get_spec(name: str) -> TaskSpec:
    """A fresh copy of the spec of built-in task (or alias) ``name``; safe to modify."""
    spec = _lookup(name).spec
    return dataclasses.replace(spec, options=list(spec.options))


def list_tasks() -> list[TaskSpec]:
    """Fresh copies of every built-in task's spec, in registry order (for ``ftlab data list``)."""
    return [get_spec(name) for name in task_names()]


def load_examples(name: str) -> list[Example]:
    """All examples of built-in task ``name``, in source order (its files must be prepared)."""
    return _lookup(name).load()


def required_files() -> list[str]:
    """The BIG-bench files the built-in tasks read, for :func:`ftlab.tasks.bigbench.prepare`."""
    return sorted({rel for task in _TASKS for rel in task.files})
