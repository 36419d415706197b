"""The two types every task is made of: an :class:`Example` and a :class:`TaskSpec`.

A task is *prompt-based*: the template turns an example's fields into a prompt, and the model
is scored on what follows the prompt: one of the label words / options (classification), or
the gold answer (generation, e.g. extractive QA).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal, Mapping

from ftlab.errors import FtlabError


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Attributes:
        id: stable identifier (``"<source>:<index>"``), used for splits and provenance.
        fields: the values the template's ``{placeholders}`` are filled with.
        label: index into :attr:`TaskSpec.options` (classification), else ``None``.
        answers: gold answers (generation); the first one is the training target.
        source: where the example came from (``file:line``), for error messages.
    """

    id: str
    fields: Mapping[str, str]
    label: int | None = None
    answers: tuple[str, ...] = ()
    source: str = ""


@dataclass
class TaskSpec:
    """How a task is phrased as a prompt and how it is scored.

    Attributes:
        name: registry name (``"sentiment"``) or the file it was loaded from.
        template: a ``str.format`` template with ``{field}`` placeholders, e.g.
            ``"{text} Overall, it was"``.
        options: the label words / answer options, in label order, each with its leading
            space (``[" negative", " positive"]``). Empty for generation tasks.
        metric: ``"accuracy"`` for classification, ``"f1"`` (with EM beside it) for generation.
        demo_separator: put between in-context demonstrations and the query.
        max_new_tokens: greedy decoding budget for generation tasks.
        description: one line for ``ftlab data list``.
    """

    name: str
    template: str
    options: list[str] = field(default_factory=list)
    metric: Literal["accuracy", "f1"] = "accuracy"
    demo_separator: str = "\n\n"
    max_new_tokens: int = 16
    description: str = ""

    def __post_init__(self) -> None:
        if not self.placeholders():
            raise FtlabError(
                f"task {self.name!r}: template {self.template!r} has no {{field}} placeholder; "
                "write e.g. '{text} It was'"
            )
        if len(set(self.options)) != len(self.options):
            raise FtlabError(f"task {self.name!r}: options {self.options} contain duplicates")
        if self.metric == "accuracy" and len(self.options) < 2:
            raise FtlabError(f"task {self.name!r}: a classification task needs >= 2 options")

    @property
    def kind(self) -> Literal["classification", "generation"]:
        return "classification" if self.options else "generation"

    def placeholders(self) -> set[str]:
        """The field names the template uses."""
        try:
            return {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        except ValueError as e:  # unbalanced braces
            raise FtlabError(f"task {self.name!r}: bad template {self.template!r}: {e}") from e

    def prompt(self, ex: Example) -> str:
        """The prompt for ``ex`` (no label)."""
        return self.template.format_map(ex.fields)

    def target(self, ex: Example) -> str:
        """The gold continuation: the label word, or the first answer with a leading space."""
        if self.kind == "classification":
            if ex.label is None:
                raise FtlabError(f"{ex.source or ex.id}: example has no label")
            return self.options[ex.label]
        if not ex.answers:
            raise FtlabError(f"{ex.source or ex.id}: example has no answer")
        return " " + ex.answers[0].strip()

    def demonstration(self, ex: Example) -> str:
        """A solved example, for in-context learning."""
        return self.prompt(ex) + self.target(ex)
