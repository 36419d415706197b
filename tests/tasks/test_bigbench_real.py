"""The BIG-bench tasks on the real BIG-bench data, an optional source: PyPI no longer serves
``bigbench==1.0.0``, so these run only where ``$FTLAB_BIGBENCH_TARBALL`` points at a copy of the
archive (they are skipped elsewhere, CI included; the default tasks' real-data tests are in
test_real_sources.py).
"""

import os
from collections import Counter

import pytest

from ftlab.tasks import load_task, make_splits, prepare_bigbench
from ftlab.tasks.bigbench import EXTRA_PATTERNS, TARBALL_ENV, extracted_files

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get(TARBALL_ENV),
                                 reason=f"optional BIG-bench source: set ${TARBALL_ENV} to a bigbench-1.0.0.tar.gz")]


@pytest.fixture(scope="module")
def loaded():
    prepare_bigbench(progress=False)
    return {name: load_task(name) for name in ("multiemo", "strategyqa", "nli", "squad")}


def _check_ids(name, examples):
    assert len({e.id for e in examples}) == len(examples)
    assert all(e.id.startswith(f"{name}:") for e in examples)


def test_multiemo(loaded):
    spec, examples = loaded["multiemo"]
    _check_ids("multiemo", examples)
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
