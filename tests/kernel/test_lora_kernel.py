"""The eNTK over LoRA weights (per-example gradient trick) against explicit per-example
gradients (float64) and against the vmap path."""

from __future__ import annotations

import pytest
import torch

from ftlab.grads.lora import lora_layers
from ftlab.kernel import KernelSpec, compute_kernel, readout_matrix, select_parameters
from ftlab.kernel.jacobians import jacobians_and_outputs, vmap_jacobians_and_outputs
from ftlab.kernel.outputs import OutputFunction, eager_attention, encode_rows, label_word_ids
from ftlab.models import LoraSettings, apply_lora
from ftlab.objectives import Encoder

from kernel_helpers import SPEC, examples, explicit_jacobians


def _lora(model, seed=0):
    """A LoRA model with B != 0 (as after training), so A's gradients are not zero either."""
    model = apply_lora(model.double(), LoraSettings(r=2, alpha=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch,attn,output", [("llama", "sdpa", "logits"), ("llama", "eager", "logits"),
                                              ("gpt2", "sdpa", "contrast")])
def test_lora_kernel_equals_gram_of_explicit_gradients(tiny_model_factory, tiny_tokenizer, tmp_path, arch, attn,
                                                      output):
    base = tiny_model_factory(arch)
    base.set_attn_implementation(attn)
    model = _lora(base)
    exs = examples()
    names = select_parameters(model, "lora")
    assert lora_layers(model, list(names)) is not None  # the hook path is the one under test
    # chunks of 3 prompts of different lengths: left padding inside every chunk
    kd = compute_kernel(model, tiny_tokenizer, SPEC, exs[:5], exs[5:], KernelSpec(params="lora", output=output,
                                                                                chunk_size=3, max_padding=10.0),
                        tmp_path / "k", progress=False)
    readout = readout_matrix(3, output)
    jac = explicit_jacobians(model, tiny_tokenizer, SPEC, exs, names, readout)
    assert jac.abs().max() > 0 and jac.shape[2] == sum(p.numel() for p in names.values())
    sgd = torch.einsum("aop,bqp->aboq", jac, jac[:5])
    sign = torch.einsum("aop,bqp->aboq", jac, torch.sign(jac[:5]))
    # Llama's eager softmax (the reference's attention) runs in float32
    tol = 1e-5 if arch == "llama" else 1e-9
    assert (kd.tensors["sgd"] - sgd).abs().max() < tol * sgd.abs().max()
    assert (kd.tensors["sign"] - sign).abs().max() < tol * sign.abs().max()


def test_hook_path_matches_vmap_path_and_leaves_the_model_as_it_was(tiny_model_factory, tiny_tokenizer):
    model = _lora(tiny_model_factory("llama"))
    for _name, p in model.named_parameters():  # frozen adapters must still get their Jacobians
        p.requires_grad_(False)
    encoder = Encoder(tiny_tokenizer, SPEC)
    fn = OutputFunction(model, label_word_ids(encoder), readout_matrix(3, "logits"))
    params = select_parameters(model, "lora")
    batch = encode_rows(encoder, examples(4))
    jac, f = jacobians_and_outputs(fn, params, batch)
    with torch.no_grad(), eager_attention(model):
        ref, f_ref = vmap_jacobians_and_outputs(fn, params, batch)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-6)
    for n in params:
        assert jac[n].shape == ref[n].shape
        torch.testing.assert_close(jac[n], ref[n], rtol=1e-4, atol=1e-5 * float(ref[n].abs().max()))
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_non_lora_parameters_take_the_vmap_path(tiny_model_factory):
    model = _lora(tiny_model_factory("llama"))
    names = list(select_parameters(model, "lora"))
    assert lora_layers(model, names[:2]) is not None
    assert lora_layers(model, names + ["base_model.model.lm_head.weight"]) is None
