"""Features checked against a naive, unpadded float64 computation, one prompt at a time."""

import copy

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.objectives import Encoder
from ftlab.probe.features import FeatureSpec, extract, middle_layer, single_token_ids
from ftlab.tasks.base import TaskSpec

PROMPTS = ["the movie was great fun. It was", "a terrible film. It was", "It was",
           "great acting and a great story, I loved every minute of it. It was", "bad. It was"]
WORDS = [" great", " terrible", " good", " bad"]


def _naive(model64, tokenizer, prompt, word_ids, layer):
    """f(s), Phi p_f(s), p on words and the layer state for one prompt, without padding, float64."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model64.model(input_ids=ids, output_hidden_states=True)
    f = out.last_hidden_state[0, -1]
    phi = model64.get_output_embeddings().weight  # V x d: row w is phi_w
    p = torch.softmax(phi @ f, -1)
    cond_mean = sum(p[w] * phi[w] for w in range(phi.shape[0]))  # sum_w p_w phi_w, term by term
    return f, cond_mean, p[list(word_ids)], out.hidden_states[layer][0, -1]


def test_features_match_naive_float64(tiny_model, tiny_tokenizer):
    model64 = copy.deepcopy(tiny_model).double()
    spec = TaskSpec(name="t", template="{text}", options=[" great", " terrible"])
    word_ids = single_token_ids(tiny_tokenizer, WORDS)
    layer = middle_layer(tiny_model)
    assert layer == 1
    fspec = FeatureSpec(("f", "phi_p", "p_words", "layer"), word_ids, layer)
    got = extract(tiny_model, Encoder(tiny_tokenizer, spec), PROMPTS, fspec, batch_size=3)  # padded batches
    with torch.no_grad():
        want = [_naive(model64, tiny_tokenizer, p, word_ids, layer) for p in PROMPTS]
    for j, kind in enumerate(("f", "phi_p", "p_words", "layer")):
        ref = torch.stack([w[j] for w in want]).float()
        assert got[kind].dtype == torch.float32 and got[kind].shape == ref.shape
        torch.testing.assert_close(got[kind], ref, rtol=1e-4, atol=2e-5)
    # Phi p is not f: the check above would pass trivially if both were the same vector.
    assert not torch.allclose(got["f"], got["phi_p"], atol=1e-2)


def test_batched_equals_one_at_a_time(tiny_model, tiny_tokenizer):
    spec = TaskSpec(name="t", template="{text}", options=[" great", " terrible"])
    fspec = FeatureSpec(("f", "phi_p"))
    enc = Encoder(tiny_tokenizer, spec)
    a = extract(tiny_model, enc, PROMPTS, fspec, batch_size=len(PROMPTS))
    b = extract(tiny_model, enc, PROMPTS, fspec, batch_size=1)
    for kind in a:
        torch.testing.assert_close(a[kind], b[kind], rtol=1e-4, atol=1e-5)


def test_multi_token_word_is_refused(tiny_tokenizer):
    with pytest.raises(FtlabError, match=r"word ' not good at all' is \d+ tokens .* single-token"):
        single_token_ids(tiny_tokenizer, [" great", " not good at all"])


def test_feature_spec_checks_its_kinds():
    with pytest.raises(FtlabError, match="choose among"):
        FeatureSpec(("f", "logits"))
    with pytest.raises(FtlabError, match="needs words"):
        FeatureSpec(("p_words",))
    with pytest.raises(FtlabError, match="layer index"):
        FeatureSpec(("layer",))
