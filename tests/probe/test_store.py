"""The feature store: resumes after a kill, refuses another model's or split's features."""

import numpy as np
import pytest

from ftlab.errors import FtlabError
from ftlab.probe import cache
from ftlab.probe.cache import split_features
from ftlab.probe.features import FeatureSpec
from ftlab.probe.store import FeatureStore, model_fingerprint
from ftlab.tasks.base import Example, TaskSpec

SPEC = TaskSpec(name="toy", template="{text} It was", options=[" great", " terrible"])
TEXTS = ["the movie was great", "a terrible film", "good acting", "bad plot", "a great story", "it was bad",
         "I loved it", "boring"]


def _examples(n=len(TEXTS), offset=0):
    return [Example(id=f"toy:{i + offset}", fields={"text": TEXTS[i % len(TEXTS)]}, label=i % 2) for i in range(n)]


def test_resumes_after_a_lost_chunk_and_computes_only_what_is_missing(tmp_path, tiny_model, tiny_tokenizer,
                                                                     monkeypatch):
    fspec = FeatureSpec(("f", "phi_p"))
    exs = _examples()
    fresh = split_features(tiny_model, tiny_tokenizer, SPEC, exs, "train", fspec)
    store = FeatureStore(tmp_path, "tiny", model_fingerprint(tiny_model))
    first = split_features(tiny_model, tiny_tokenizer, SPEC, exs, "train", fspec, store, chunk_rows=3)
    for kind in fresh:
        np.testing.assert_allclose(first[kind], fresh[kind], rtol=1e-5, atol=1e-6)
    chunks = sorted((tmp_path / "toy" / "train" / "phi_p").glob("chunk-*.npy"))
    assert len(chunks) == 3
    chunks[-1].unlink()  # as if killed before the last chunk of one kind was written
    seen = []
    real = cache.extract
    monkeypatch.setattr(cache, "extract", lambda m, e, prompts, s, b: seen.append((len(prompts), s.kinds))
                        or real(m, e, prompts, s, b))
    again = split_features(tiny_model, tiny_tokenizer, SPEC, exs, "train", fspec, store, chunk_rows=3)
    assert seen == [(2, ("phi_p",))]  # only the 2 rows of the lost chunk, only for that kind
    for kind in fresh:
        np.testing.assert_array_equal(again[kind], first[kind])


def test_refuses_another_models_store(tmp_path, tiny_model):
    FeatureStore(tmp_path, "tiny", model_fingerprint(tiny_model))
    with pytest.raises(FtlabError, match=r"holds features of model 'tiny'.*not 'other'.*another store folder"):
        FeatureStore(tmp_path, "other", model_fingerprint(tiny_model))
    with pytest.raises(FtlabError, match="other weights"):
        FeatureStore(tmp_path, "tiny", "0123456789abcdef")


def test_refuses_a_split_of_other_examples(tmp_path, tiny_model, tiny_tokenizer):
    store = FeatureStore(tmp_path, "tiny", model_fingerprint(tiny_model))
    fspec = FeatureSpec(("f",))
    split_features(tiny_model, tiny_tokenizer, SPEC, _examples(4), "test", fspec, store)
    with pytest.raises(FtlabError, match=r"toy/test/f holds f features of other ids_sha256.*split 'test'"):
        split_features(tiny_model, tiny_tokenizer, SPEC, _examples(4, offset=10), "test", fspec, store)
    # other words for p_words are refused the same way
    split_features(tiny_model, tiny_tokenizer, SPEC, _examples(4), "test", FeatureSpec(("p_words",), (5, 6)), store)
    with pytest.raises(FtlabError, match="other word_ids"):
        split_features(tiny_model, tiny_tokenizer, SPEC, _examples(4), "test", FeatureSpec(("p_words",), (5, 7)),
                       store)
