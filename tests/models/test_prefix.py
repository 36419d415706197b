"""Prefix tuning: a prefix from real activations of tokens r must act exactly like prepending r."""

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.models import PrefixModel, PrefixSettings

TEXTS = ["The movie was great and the acting was good", "bad", "It was a terrible film"]


def _batch(tokenizer, texts, side):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    return rows, ids, mask


def _assert_acts_like_prepended(base, wrapper, tokenizer, texts, side, atol=1e-5):
    """Wrapper logits on the padded batch == base logits on [r, x] for each unpadded row x."""
    rows, ids, mask = _batch(tokenizer, texts, side)
    with torch.no_grad():
        got = wrapper(input_ids=ids, attention_mask=mask).logits
        r = wrapper.init_token_ids
        for i, row in enumerate(rows):
            want = base(input_ids=torch.cat([r, torch.tensor(row)])[None]).logits[0, len(r):]
            torch.testing.assert_close(got[i][mask[i].bool()], want, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_activation_prefix_equals_prepending_tokens(tiny_model, tiny_tokenizer, side):
    wrapper = PrefixModel(tiny_model, PrefixSettings(num_tokens=4), seed=3)
    assert wrapper.prefix_keys[0].shape == (2, 4, 16)  # (kv heads, tokens, head dim)
    _assert_acts_like_prepended(tiny_model, wrapper, tiny_tokenizer, TEXTS, side)


def test_sliding_window_layers(tiny_model_factory, tiny_tokenizer):
    """Gemma3-style sliding-window layers (window 8 < prefix + text): right padding is exact.
    Left padding is exact only for rows inside the window, as for the base model itself
    (transformers slides the window over cache slots, pads included)."""
    base = tiny_model_factory("gemma3")
    wrapper = PrefixModel(base, PrefixSettings(num_tokens=3), seed=0)
    _assert_acts_like_prepended(base, wrapper, tiny_tokenizer, TEXTS, "right")
    _assert_acts_like_prepended(base, wrapper, tiny_tokenizer, ["bad", "It was"], "left")


def test_incremental_decoding_matches_full_forward(tiny_model, tiny_tokenizer):
    wrapper = PrefixModel(tiny_model, PrefixSettings(num_tokens=2), seed=0)
    _, ids, mask = _batch(tiny_tokenizer, TEXTS, "left")
    nxt = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        out = wrapper(input_ids=ids, attention_mask=mask, use_cache=True)
        pos = (mask.cumsum(-1) - 1)[:, -1:] + 1
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        step = wrapper(input_ids=nxt, attention_mask=mask2, position_ids=pos,
                       past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        full = wrapper(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_gradients_reach_only_the_prefix(tiny_model, tiny_tokenizer):
    wrapper = PrefixModel(tiny_model, PrefixSettings(num_tokens=3), seed=0).train()
    _, ids, mask = _batch(tiny_tokenizer, TEXTS, "left")
    wrapper(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable == {f"prefix_{kv}.{i}" for kv in ("keys", "values") for i in range(2)}
    for name, p in wrapper.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_init_is_seeded(tiny_model):
    a = PrefixModel(tiny_model, PrefixSettings(num_tokens=3, init="random"), seed=1)
    b = PrefixModel(tiny_model, PrefixSettings(num_tokens=3, init="random"), seed=1)
    c = PrefixModel(tiny_model, PrefixSettings(num_tokens=3, init="random"), seed=2)
    assert torch.equal(a.prefix_values[1], b.prefix_values[1])
    assert not torch.equal(a.prefix_values[1], c.prefix_values[1])
    real = PrefixModel(tiny_model, PrefixSettings(num_tokens=3), seed=1)
    assert torch.equal(real.init_token_ids, a.init_token_ids)
    assert not torch.equal(real.prefix_keys[0], a.prefix_keys[0])


def test_save_and_load_round_trip(tiny_model_factory, tiny_tokenizer, tmp_path):
    wrapper = PrefixModel(tiny_model_factory("llama"), PrefixSettings(num_tokens=2), seed=0)
    with torch.no_grad():
        for p in wrapper.prefix_keys:
            p.add_(torch.randn_like(p))  # trained values, not the ones init would recompute
    wrapper.save_pretrained(tmp_path / "prefix")
    loaded = PrefixModel.from_pretrained(tiny_model_factory("llama"), tmp_path / "prefix")
    _, ids, mask = _batch(tiny_tokenizer, TEXTS, "right")
    with torch.no_grad():
        assert torch.equal(wrapper(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(FtlabError, match="trained for a 'llama' model, not 'gemma3_text'"):
        PrefixModel.from_pretrained(tiny_model_factory("gemma3"), tmp_path / "prefix")
    shallower = tiny_model_factory("llama")
    shallower.model.layers = shallower.model.layers[:1]
    shallower.config.num_hidden_layers = 1
    with pytest.raises(FtlabError, match="does not fit"):
        PrefixModel.from_pretrained(shallower, tmp_path / "prefix")
    with pytest.raises(FtlabError, match="not a saved prefix"):
        PrefixModel.from_pretrained(tiny_model_factory("llama"), tmp_path)


@pytest.mark.parametrize("change,match", [({"num_tokens": 0}, "num_tokens"), ({"init": "zeros"}, "prefix.init")])
def test_bad_settings(tiny_model, change, match, refused_both_ways):
    refused_both_ways(PrefixSettings, change, match, lambda settings: PrefixModel(tiny_model, settings))


@pytest.mark.slow
def test_smollm2_prefix_equals_prepending_tokens(smollm2):
    model, tokenizer = smollm2
    wrapper = PrefixModel(model, PrefixSettings(num_tokens=5), seed=0)
    try:
        _assert_acts_like_prepended(model, wrapper, tokenizer, TEXTS, "left", atol=1e-4)
    finally:
        model.requires_grad_(True)  # the session's model is shared: undo the wrapper's freezing
