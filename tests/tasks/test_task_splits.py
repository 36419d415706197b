"""make_splits: deterministic, disjoint, test set fixed across seeds, balanced k-shot."""

import random
from collections import Counter

import pytest

from ftlab.errors import FtlabError
from ftlab.tasks import Example, make_splits


def _examples(n, classes=2):
    return [Example(id=f"t:{i}", fields={"text": str(i)}, label=i % classes) for i in range(n)]


def _ids(split):
    return [e.id for e in split]


def test_same_inputs_same_splits_and_disjoint():
    data = _examples(100)
    a = make_splits(data, seed=3, n_train=30, n_dev=20, n_test=40)
    b = make_splits(list(data), seed=3, n_train=30, n_dev=20, n_test=40)
    assert (_ids(a.train), _ids(a.dev), _ids(a.test)) == (_ids(b.train), _ids(b.dev), _ids(b.test))
    assert (len(a.train), len(a.dev), len(a.test)) == (30, 20, 40) and a.note == ""
    assert len(set(_ids(a.train)) | set(_ids(a.dev)) | set(_ids(a.test))) == 90


def test_test_set_depends_on_data_seed_only():
    data = _examples(200)
    runs = [make_splits(data, seed=s, n_train=50, n_dev=20, n_test=60) for s in range(4)]
    assert all(_ids(r.test) == _ids(runs[0].test) for r in runs)
    assert len({tuple(_ids(r.train)) for r in runs}) == 4  # seeds do change train
    other = make_splits(data, seed=0, n_train=50, n_dev=20, n_test=60, data_seed=1)
    assert _ids(other.test) != _ids(runs[0].test)


def test_larger_sets_extend_smaller_ones():
    data = _examples(300)
    small = make_splits(data, seed=1, n_train=10, n_dev=0, n_test=50)
    large = make_splits(data, seed=1, n_train=20, n_dev=0, n_test=100)
    assert _ids(large.test)[:50] == _ids(small.test)


def test_no_global_random_state_is_used_or_changed():
    random.seed(123)
    state = random.getstate()
    first = make_splits(_examples(50), seed=0, n_train=10, n_dev=10, n_test=10)
    assert random.getstate() == state
    random.seed(999)
    assert _ids(make_splits(_examples(50), seed=0, n_train=10, n_dev=10, n_test=10).train) == _ids(first.train)


def test_too_few_examples_scales_all_sizes_and_says_so():
    s = make_splits(_examples(735), seed=0, n_train=1000, n_dev=500, n_test=1000)
    assert (len(s.train), len(s.dev), len(s.test)) == (294, 147, 294)
    assert "only 735 examples" in s.note and "1000/500/1000 to 294/147/294" in s.note


def test_k_per_class_is_balanced_and_keeps_the_test_set():
    data = _examples(300, classes=3)
    plain = make_splits(data, seed=0, n_train=10, n_dev=10, n_test=90)
    for seed in range(3):
        s = make_splits(data, seed=seed, n_train=999, n_dev=999, n_test=90, k_per_class=4)
        assert Counter(e.label for e in s.train) == {0: 4, 1: 4, 2: 4}
        assert Counter(e.label for e in s.dev) == {0: 4, 1: 4, 2: 4}
        assert _ids(s.test) == _ids(plain.test)
        assert not set(_ids(s.train)) & set(_ids(s.dev)) and not set(_ids(s.train) + _ids(s.dev)) & set(_ids(s.test))
    assert make_splits(data, seed=0, n_train=0, n_dev=0, n_test=90, k_per_class=4).dev == []


def test_k_per_class_errors():
    skewed = _examples(40) + [Example(id="t:x", fields={"text": "x"}, label=2)]
    with pytest.raises(FtlabError, match=r"k_per_class=2: class 2 has only 1 examples"):
        make_splits(skewed, seed=0, n_train=0, n_dev=10, n_test=10, k_per_class=2)
    qa = [Example(id=f"q:{i}", fields={"q": "?"}, answers=("a",)) for i in range(10)]
    with pytest.raises(FtlabError, match="generation"):
        make_splits(qa, seed=0, n_train=2, n_dev=2, n_test=2, k_per_class=1)
    with pytest.raises(FtlabError, match=">= 1"):
        make_splits(_examples(10), seed=0, n_train=2, n_dev=2, n_test=2, k_per_class=0)


def test_small_pool_caps_test_for_k_shot():
    data = _examples(20)
    s = make_splits(data, seed=0, n_train=0, n_dev=1, n_test=100, k_per_class=3)
    assert (len(s.train), len(s.dev)) == (6, 6) and 0 < len(s.test) <= 8
    assert f"n_test capped from 100 to {len(s.test)}" in s.note
    # the capped test set is still the data_seed draw: a prefix of the uncapped one
    assert _ids(s.test) == _ids(make_splits(data, seed=5, n_train=0, n_dev=0, n_test=20).test)[:len(s.test)]


def test_empty_and_negative_are_refused():
    with pytest.raises(FtlabError, match="no examples"):
        make_splits([], seed=0, n_train=1, n_dev=1, n_test=1)
    with pytest.raises(FtlabError, match=">= 0"):
        make_splits(_examples(10), seed=0, n_train=-1, n_dev=1, n_test=1)
