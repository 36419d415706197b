"""The BIG-bench loaders (an optional source) and load_task's dispatch, on small fake BIG-bench files."""

import pytest

from ftlab.errors import FtlabError
from ftlab.tasks import get_spec, list_tasks, load_task, prepare_bigbench
from ftlab.tasks.registry import required_files


@pytest.fixture
def prepared(cache, fake_tarball):
    prepare_bigbench(required_files(), tarball=fake_tarball, progress=False)


def test_multiemo_keeps_positive_and_negative_once(prepared):
    spec, examples = load_task("multiemo")
    # source order: 0 pos, 1 neutral, 2 neg, 3 ambivalent, 4 repeat of 0, 5 blank, 6 neg
    assert [(e.id, e.fields["text"], e.label) for e in examples] == [
        ("multiemo:0", "Great doctor, very kind.", 1),
        ("multiemo:2", "Rude staff and dirty rooms.", 0),
        ("multiemo:6", "Never again.", 0)]
    assert examples[1].source == "multiemo/all_sentence_en/task.json:2"
    assert spec.demonstration(examples[0]) == "Review: Great doctor, very kind.\nSentiment: positive"


def test_strategyqa_labels_follow_options(prepared):
    spec, examples = load_task("strategyqa")
    assert [spec.target(e) for e in examples] == [" Yes", " No"]
    assert spec.prompt(examples[1]) == ("Question: Hydrogen's atomic number squared exceeds number of Spice Girls?"
                                        "\nAnswer:")


def test_nli_parses_premise_and_hypothesis(prepared):
    spec, examples = load_task("nli")
    assert examples[2].fields == {"premise": "The king of France is bald.", "hypothesis": "France has no king."}
    assert [spec.target(e) for e in examples] == [" True", " Neither", " False"]
    assert spec.prompt(examples[0]) == ("He fell on his knees.\nQuestion: He was standing earlier. "
                                        "True, False or Neither?\nAnswer:")


def test_squad_questions_with_all_gold_answers(prepared):
    spec, examples = load_task("squad")
    assert spec.kind == "generation" and spec.metric == "f1"
    assert [e.id for e in examples] == ["squad:0", "squad:1", "squad:2"]
    assert examples[0].answers == ("Denver", "Denver Broncos")  # repeats dropped, order kept
    assert examples[2].fields == {"title": "Super Bowl 50", "context": "It was played in 2016.", "question": "When?"}
    assert spec.target(examples[2]) == " 2016"


def test_aliases_and_overrides(prepared):
    spec, examples = load_task("bigbench_sentiment", template="{text} It was", options=[" terrible", " great"])
    assert spec.name == "multiemo" and len(examples) == 3
    assert spec.demonstration(examples[0]) == "Great doctor, very kind. It was great"
    assert get_spec("multiemo").options == [" negative", " positive"]  # registry untouched


@pytest.mark.parametrize("kwargs,match", [
    ({"options": [" a", " b", " c"]}, "needs 2 options"),
    ({"template": "{sentence} It was"}, r"fields \['sentence'\] the task lacks; use \['text'\]"),
    ({"metric": "f1"}, "its metric is 'accuracy'"),
    ({"metric": "bleu"}, "metric must be"),
])
def test_bad_overrides_are_refused(kwargs, match):
    with pytest.raises(FtlabError, match=match):
        load_task("sentiment", **kwargs)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(FtlabError,
                       match=r"unknown task 'sst9'; built-in tasks: sentiment, sentiment_tweets, .*, strategyqa, nli"):
        load_task("sst9")


def test_unprepared_bigbench_says_pass_the_tarball(cache):
    with pytest.raises(FtlabError, match=r"no longer on PyPI\): run `ftlab data prepare --tarball PATH`"):
        load_task("strategyqa")


def test_list_tasks_returns_copies():
    specs = list_tasks()
    assert [s.name for s in specs] == [
        "sentiment", "sentiment_tweets", "sentiment_amazon", "sentiment_nyt", "trec", "boolq", "piqa", "siqa",
        "openbookqa", "commonsenseqa", "disflqa", "factual_summary", "corr2cause", "corr2cause_binary",
        "multiemo", "strategyqa", "nli", "squad", "nli_binary", "epistemic_reasoning", "analytic_entailment"]
    specs[0].options.append(" neutral")
    assert list_tasks()[0].options == [" negative", " positive"]
    assert all(s.description for s in specs)
