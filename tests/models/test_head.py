"""output_head: the same logits and gradients as the model's own head, for the whole vocabulary
or a few rows; undone on exit; nested blocks; weights swapped by functional_call."""

import pytest
import torch
from torch.func import functional_call

from ftlab.models import LoraSettings, apply_lora
from ftlab.models.head import output_head

ROWS = [7, 3, 11]


def _batch(tokenizer):
    """Two left-padded rows (padded by hand: ``padding=True`` would switch padding on in the
    session-wide tokenizer's backend)."""
    rows = [tokenizer(t).input_ids for t in ("The movie was great", "A dull and far too long film about nothing")]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, logits_to_keep=2, use_cache=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_same_logits_and_gradients(tiny_model_factory, tiny_tokenizer, arch):
    model = tiny_model_factory(arch).double()
    if arch == "gemma3":  # elementwise post-processing of the head's output must still apply
        model.config.final_logit_softcapping = 5.0
    batch = _batch(tiny_tokenizer)
    ref = model(**batch).logits
    ref_grad = torch.autograd.grad(ref[..., ROWS].square().sum(), model.get_output_embeddings().weight)[0]
    with output_head(model) as replaced:
        full = model(**batch).logits
    assert replaced and full.shape == ref.shape
    torch.testing.assert_close(full, ref)
    with output_head(model, ROWS) as replaced:
        narrow = model(**batch).logits
        grad = torch.autograd.grad(narrow.square().sum(), model.get_output_embeddings().weight)[0]
    assert replaced and narrow.shape == (*ref.shape[:-1], len(ROWS))
    torch.testing.assert_close(narrow, ref[..., ROWS])
    torch.testing.assert_close(grad, ref_grad)
    assert "forward" not in vars(model.get_output_embeddings())  # the class's forward again
    assert torch.equal(model(**batch).logits, ref)


def test_nested_blocks_and_a_peft_model(tiny_model, tiny_tokenizer):
    model = apply_lora(tiny_model, LoraSettings(r=2))
    batch = _batch(tiny_tokenizer)
    ref = model(**batch).logits
    with output_head(model, ROWS):
        with output_head(model) as inner:
            assert inner and model(**batch).logits.shape == ref.shape
        assert model(**batch).logits.shape[-1] == len(ROWS)  # the outer block's head is back
    assert model(**batch).logits.shape == ref.shape


def test_functional_call_weights_apply(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    name = next(n for n, p in tiny_model.named_parameters() if p is tiny_model.get_output_embeddings().weight)
    other = torch.randn_like(tiny_model.get_output_embeddings().weight)
    ref = functional_call(tiny_model, {name: other}, (), batch).logits
    with output_head(tiny_model, ROWS):
        narrow = functional_call(tiny_model, {name: other}, (), batch).logits
    torch.testing.assert_close(narrow, ref[..., ROWS])


def test_a_model_without_a_linear_head_runs_its_own():
    module = torch.nn.Linear(4, 4)
    with output_head(module, ROWS) as replaced:
        assert not replaced
