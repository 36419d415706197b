"""The entailment-vs-not tasks of the seed topography (nli_binary and two OOD tests), on small fake
BIG-bench files: one prompt and one pair of label words for them and the default entailment tasks."""

import pytest

from ftlab.tasks import load_task, prepare_bigbench
from ftlab.tasks.parsers import ENTAILMENT_OPTIONS
from ftlab.tasks.registry import required_files


@pytest.fixture
def prepared(cache, fake_tarball):
    prepare_bigbench(required_files(), tarball=fake_tarball, progress=False)


def test_three_tasks_share_prompt_and_label_words(prepared):
    specs = {name: load_task(name)[0] for name in ("nli_binary", "epistemic_reasoning", "analytic_entailment",
                                                    "factual_summary", "corr2cause_binary")}
    assert {tuple(s.options) for s in specs.values()} == {ENTAILMENT_OPTIONS}
    assert len({s.template for s in specs.values()}) == 1


def test_nli_binary_merges_neutral_and_contradiction(prepared):
    _, three = load_task("nli")
    spec, two = load_task("presuppositions_as_nli_binary")
    assert [e.label for e in three] == [0, 1, 2] and [e.label for e in two] == [0, 1, 1]
    assert [spec.target(e) for e in two] == [" Yes", " No", " No"]
    assert [e.id for e in two] == ["nli_binary:0", "nli_binary:1", "nli_binary:2"]
    assert two[0].fields == three[0].fields


def test_ood_tasks_split_premise_and_hypothesis(prepared):
    spec, ep = load_task("epistemic_reasoning")
    assert ep[0].fields == {"premise": "Amelia assumes that Joseph knows that a dog runs.",
                            "hypothesis": "Joseph knows that a dog runs."}
    assert [e.label for e in ep] == [1, 0]
    spec, an = load_task("analytic_entailment")
    assert [e.fields for e in an] == [{"premise": "Lina met two nurses.", "hypothesis": "Lina met at least one woman."},
                                      {"premise": "Fido is a dog.", "hypothesis": "Fido is a mammal."}]
    assert [e.label for e in an] == [1, 0]
    assert spec.prompt(an[1]) == ("Premise: Fido is a dog.\nHypothesis: Fido is a mammal.\n"
                                  "Does the premise entail the hypothesis?\nAnswer:")
