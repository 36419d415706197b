import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ftlab.errors import FtlabError
from ftlab.tint.inner import check_supported, forward, inner_from_hf

from tint_helpers import tiny_llama


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_transformers(tied):
    hf = tiny_llama(tied=tied)
    inner = inner_from_hf(hf)
    ids = torch.randint(0, 61, (20,), generator=torch.Generator().manual_seed(0))
    ours, _ = forward(inner, ids)
    theirs = hf(ids[None]).logits[0]
    # transformers' RMSNorm and rotary tables compute in float32 even for float64 models
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-6)
    assert (ours - theirs).abs().max() < 1e-3 * theirs.abs().max()
    assert (inner.lm_head is inner.embed) == tied


def test_gpt2_is_refused_naming_the_missing_piece():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(FtlabError, match="no Llama-style decoder layers"):
        check_supported(gpt2)


def test_gelu_mlp_is_refused():
    hf = tiny_llama()
    hf.config.hidden_act = "gelu"
    with pytest.raises(FtlabError, match="activation 'gelu'"):
        inner_from_hf(hf)


def test_gemma3_is_refused():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8, vocab_size=50)
    with pytest.raises(FtlabError, match="q_norm"):
        check_supported(Gemma3ForCausalLM(cfg))
