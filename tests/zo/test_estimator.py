"""The MeZO estimate is the directional derivative along z; non-finite losses skip the step."""

import copy

import pytest
import torch

from ftlab.zo import MeZO


def _z(opt, seed):
    """z of every parameter for ``seed``, materialised from the optimizer's own chunks."""
    return [torch.cat([(z * s).reshape(-1) for _, z, s in opt._z_chunks(seed, i, p)]).view_as(p)
            for i, p, _ in opt._params()]


def _lm_loss(model, ids):
    # transformers' own loss upcasts logits with .float(), i.e. to float32: compute it in float64
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("one_sided,tol", [(False, 1e-6), (True, 1e-4)])
def test_estimate_is_the_directional_derivative(tiny_model_factory, one_sided, tol):
    """Central differences err by O(eps^2), forward differences by O(eps): in float64 with
    eps = 1e-6 the estimate equals grad . z computed by autograd. (GPT-2: its layers really run
    in float64; Llama's RMSNorm and rotary embedding upcast to float32 only.)"""
    model = tiny_model_factory("gpt2").double()
    ids = torch.arange(2, 26).view(2, 12)
    grad_model = copy.deepcopy(model)
    grad_model.set_attn_implementation("eager")  # SDPA on the CPU has no double backward
    params = list(grad_model.parameters())
    grads = torch.autograd.grad(_lm_loss(grad_model, ids), params, create_graph=True)
    eps = 1e-6
    opt = MeZO(model.parameters(), lr=0.0, eps=eps, seed=4, one_sided=one_sided)
    for _ in range(3):
        with torch.no_grad():
            opt.step(lambda: _lm_loss(model, ids))
        seed, g = opt.history[-1].seeds[0], opt.history[-1].grads[0]
        zs = _z(opt, seed)
        true = sum(float((gr.detach() * z).sum()) for gr, z in zip(grads, zs))
        assert abs(true) > 1e-3  # a direction the loss changes along
        if one_sided:  # the forward difference's leading error term, eps/2 z^T H z (Hessian-vector product)
            hz = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=True)
            true += eps / 2 * sum(float((h * z).sum()) for h, z in zip(hz, zs))
        assert g == pytest.approx(true, rel=tol)


@pytest.mark.parametrize("exact", [False, True])
def test_non_finite_loss_skips_the_update(tiny_model_factory, exact):
    model = tiny_model_factory("llama")
    base = copy.deepcopy(model)
    ids = torch.arange(2, 20)[None]
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3, exact=exact, weight_decay=0.1)
    opt.attach(model)
    calls = []

    def closure():
        calls.append(1)
        loss = model(input_ids=ids, labels=ids).loss
        return loss * float("nan") if len(calls) == 2 else loss
    loss = opt.step(closure)
    assert torch.isnan(loss)
    record = opt.history[-1]
    assert record.lr == 0.0 and record.grads == [0.0]  # logged as a no-op, so a replay skips it too
    for p, q in zip(model.parameters(), base.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # restored (in place: up to rounding)
    opt.step(closure)
    assert opt.history[-1].lr > 0 and any(not torch.equal(p, q) for p, q in zip(model.parameters(),
                                                                                base.parameters()))
