"""The built-in tasks on the real BIG-bench data (prepared once into the ftlab cache).

The first run downloads the 358 MB archive with pip unless $FTLAB_BIGBENCH_TARBALL points at a
copy; later runs only verify the extracted files' checksums.
"""

from collections import Counter

import pytest

from ftlab.tasks import load_task, make_splits
from ftlab.tasks.bigbench import EXTRA_PATTERNS, extracted_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(bigbench):
    return {name: load_task(name) for name in ("sentiment", "strategyqa", "nli", "squad")}


def _check_ids(name, examples):
    assert len({e.id for e in examples}) == len(examples)
    assert all(e.id.startswith(f"{name}:") for e in examples)


def test_sentiment(loaded):
    spec, examples = loaded["sentiment"]
    _check_ids("sentiment", examples)
    # 15,324 positive + 21,156 negative sentences, less 7 blank ones and 152 repeats
    assert len(examples) == 36_321
    assert Counter(e.label for e in examples) == {0: 21_087, 1: 15_234}
    assert all(e.fields["text"] for e in examples)


def test_strategyqa(loaded):
    spec, examples = loaded["strategyqa"]
    _check_ids("strategyqa", examples)
    assert len(examples) == 2_290
    assert Counter(spec.target(e) for e in examples) == {" No": 1_219, " Yes": 1_071}


def test_nli(loaded):
    spec, examples = loaded["nli"]
    _check_ids("nli", examples)
    assert len(examples) == 735
    assert Counter(spec.target(e) for e in examples) == {" True": 301, " Neither": 307, " False": 127}
    assert all(e.fields["premise"] and e.fields["hypothesis"] and "Sentence" not in e.fields["hypothesis"]
               for e in examples)


def test_squad(loaded):
    spec, examples = loaded["squad"]
    _check_ids("squad", examples)
    assert len(examples) == 10_565 and spec.kind == "generation"
    assert all(e.answers and all(e.answers) for e in examples)
    # extractive: every gold answer is a span of its context
    assert all(a in e.fields["context"] for e in examples for a in e.answers)


def test_natural_instructions_extracted(loaded):
    assert len(extracted_files(EXTRA_PATTERNS)) == 61


def test_default_protocol_on_the_smallest_task(loaded):
    _, examples = loaded["nli"]
    splits = make_splits(examples, seed=0, n_train=1000, n_dev=500, n_test=1000)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (294, 147, 294) and splits.note
