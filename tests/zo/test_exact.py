"""Exact mode: perturbation inside module forwards, so low-precision weights are restored bit
for bit and a step changes them by exactly its update."""

import copy

import pytest
import torch

from ftlab.config import LoraSettings, PrefixSettings
from ftlab.errors import FtlabError
from ftlab.models import prepare_model
from ftlab.zo import MeZO

IDS = torch.arange(2, 34).view(2, 16)


def _loss(module):
    return lambda: module(input_ids=IDS, labels=IDS).loss


def _update_alone(model, opt_kwargs, records):
    """The weights the updates of ``records`` alone give (no perturbation, no forward)."""
    opt = MeZO(model.parameters(), exact=True, **opt_kwargs)
    for r in records:
        opt._update(r.seeds, r.grads, r.lr)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_step_equals_its_update_bitwise(tiny_model_factory, dtype):
    model = tiny_model_factory("llama").to(dtype)
    base = copy.deepcopy(model)
    kwargs = dict(lr=1e-3, eps=1e-2, seed=5, weight_decay=0.1, n_perturbations=2)
    opt = MeZO(model.parameters(), **kwargs)
    assert opt.exact  # the default for bf16/fp16
    opt.attach(model)
    for _ in range(3):
        opt.step(_loss(model))
    assert all(g != 0 for r in opt.history for g in r.grads)  # the perturbations were applied
    want = _update_alone(base, kwargs, opt.history)
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        assert torch.equal(p, q), name


def test_in_place_low_precision_drifts(tiny_model_factory):
    """What exact mode fixes: in place, +eps, -2 eps, +eps does not round back in bf16."""
    model = tiny_model_factory("llama").to(torch.bfloat16)
    base = copy.deepcopy(model)
    kwargs = dict(lr=0.0, eps=1e-2, seed=5)
    opt = MeZO(model.parameters(), exact=False, **kwargs)
    opt.step(_loss(model))
    drift = [not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters())]
    assert any(drift)  # lr = 0, yet the weights moved


def test_hooked_forward_sees_the_perturbed_weights(tiny_model_factory):
    """L+ in exact mode equals the loss of an explicitly perturbed copy, bit for bit."""
    model = tiny_model_factory("llama").to(torch.bfloat16)
    copy_ = copy.deepcopy(model)
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-2, seed=9)
    opt.attach(model)
    opt.step(_loss(model))
    seed = opt.history[-1].seeds[0]
    moved = MeZO(copy_.parameters(), eps=1e-2, exact=False)
    moved._apply(seed, 1e-2)
    with torch.no_grad():
        assert float(_loss(copy_)()) == opt.history[-1].loss


@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
def test_exact_and_in_place_estimates_agree_in_float64(tiny_model_factory, mode):
    """Every trainable tensor is perturbed in exact mode -- tied embeddings, LoRA matrices and
    prefix k/v in ParameterLists included -- so in float64 both modes estimate the same g."""
    grads = {}
    for exact in (False, True):
        model = tiny_model_factory("llama").double()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = prepare_model(model, mode, lora=LoraSettings(r=2), prefix=PrefixSettings(num_tokens=2),
                                   seed=0).double()
        params = [p for p in module.parameters() if p.requires_grad]
        opt = MeZO(params, lr=1e-3, eps=1e-4, seed=2, exact=exact)
        opt.attach(module)
        for _ in range(2):
            opt.step(_loss(module))
        grads[exact] = [g for r in opt.history for g in r.grads]
    assert grads[True] == pytest.approx(grads[False], rel=1e-6, abs=1e-9)


def test_exact_mode_needs_attach(tiny_model_factory):
    model = tiny_model_factory("llama")
    opt = MeZO(model.parameters(), exact=True)
    with pytest.raises(FtlabError, match="attach"):
        opt.step(_loss(model))


def test_a_failing_forward_leaves_the_weights_restored(tiny_model_factory):
    model = tiny_model_factory("llama").to(torch.bfloat16)
    base = copy.deepcopy(model)
    opt = MeZO(model.parameters(), eps=1e-2)
    opt.attach(model)

    def boom():
        # The pre-hook perturbs the weight, then the forward fails on the wrong input width.
        model.model.layers[0].mlp.gate_proj(torch.zeros(1, 3, 7, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError):
        opt.step(boom)
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)
