"""The entailment-vs-not tasks of the seed topography (nli_binary and two OOD tests), on small fake
BIG-bench files: one prompt and one pair of label words for all three."""

import pytest

from ftlab.tasks import load_task, prepare
from ftlab.tasks.registry import ENTAILMENT_OPTIONS, required_files


@pytest.fixture
def prepared(cache, fake_tarball):
    prepare(required_files(), tarball=fake_tarball, progress=False)


def test_three_tasks_share_prompt_and_label_words(prepared):
    specs = {name: load_task(name)[0] for name in ("nli_binary", "epistemic_reasoning", "analytic_entailment")}
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


@pytest.mark.slow
def test_real_bigbench_counts(bigbench):
    from collections import Counter

    counts = {name: Counter(e.label for e in load_task(name)[1])
              for name in ("nli_binary", "epistemic_reasoning", "analytic_entailment")}
    # label 0 = entailment: 301 of presuppositions_as_nli's 735; 741 of epistemic's 2,000; 30 of analytic's 70
    assert counts == {"nli_binary": {0: 301, 1: 434}, "epistemic_reasoning": {0: 741, 1: 1259},
                      "analytic_entailment": {0: 30, 1: 40}}
