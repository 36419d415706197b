"""First-order training essentials of ftlab.train: bf16 autocast of the forwards (checked against
a hand-written autocast step, refused where bf16 is not supported) and activation checkpointing
(the same gradients, the blocks run twice)."""

from __future__ import annotations

import pytest
import torch

from ftlab import objectives
from ftlab.config import TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.models import trainable_parameters
from ftlab.objectives import Encoder
from ftlab.parallel import bf16_autocast, micro_batches
from ftlab.tasks.base import Example, TaskSpec
from ftlab.train import build_trainer, make_closure

SPEC = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
TEXTS = ["the movie was great", "a story", "the film and the acting and the story were good", "it",
         "the acting was bad and the film was long", "good", "the story was a film", "bad bad"]
EXAMPLES = [Example(id=f"e:{i}", fields={"text": t}, label=i % 2) for i, t in enumerate(TEXTS)]


def _module(model, mode, extra=()):
    cfg = load_config(TrainConfig, None, [f"mode={mode}", "optimizer=sgd", "lr=0.1", "lora.r=2",
                                          "prefix.num_tokens=2", *extra])
    module, optimizer, _ = build_trainer(cfg, model)
    module.train()
    return module, optimizer


def _grads(module, optimizer, tokenizer, autocast=None, k=1):
    encoder = Encoder(tokenizer, SPEC)
    parts = [objectives.objective_fn("loss", module, tokenizer, encoder, micro, "cpu")
             for micro in micro_batches(EXAMPLES, k)]
    loss = make_closure(optimizer, parts, None, autocast=autocast)()
    return float(loss), {n: p.grad.clone() for n, p in trainable_parameters(module)}


def test_bf16_autocast_runs_the_forward_in_bf16_and_matches_a_hand_written_step(tiny_model, tiny_tokenizer):
    module, optimizer = _module(tiny_model, "lora")
    dtypes = []
    layer = module.get_base_model().model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    loss, grads = _grads(module, optimizer, tiny_tokenizer, autocast=bf16_autocast("cpu"))
    assert dtypes == [torch.bfloat16]
    # the same step written by hand: forward under torch.autocast, backward outside it
    optimizer.zero_grad()
    encoder = Encoder(tiny_tokenizer, SPEC)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = objectives.objective_fn("loss", module, tiny_tokenizer, encoder, EXAMPLES, "cpu")()
    want.backward()
    assert loss == float(want.detach())
    for name, p in trainable_parameters(module):
        assert torch.equal(grads[name], p.grad), name
    # ... and it is not the float32 step (bf16 rounding), though close to it
    fp32_loss, fp32 = _grads(module, optimizer, tiny_tokenizer)
    handle.remove()
    assert dtypes[-1] == torch.float32 and fp32_loss != loss
    assert fp32_loss == pytest.approx(loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for _, p in trainable_parameters(module))
    moved = [n for n in fp32 if fp32[n].abs().sum() > 0]  # LoRA's A gets no gradient while B = 0
    assert moved and all(not torch.equal(fp32[n], grads[n]) for n in moved)
    for name in moved:  # bf16 keeps ~3 significant digits per op
        assert float((grads[name] - fp32[name]).norm() / fp32[name].norm()) < 0.05, name


def test_autocast_where_bf16_is_not_supported_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    with pytest.raises(FtlabError, match=r"^autocast=true needs bf16, which Tesla V100-SXM2-16GB does not "
                                         r"support \(compute capability 8.0\+ needed\); set autocast=false"):
        bf16_autocast("cuda")
    from ftlab.train import train

    cfg = load_config(TrainConfig, None, ["autocast=true", "device=cuda", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(FtlabError, match="needs bf16"):  # before any model is loaded
        train(cfg, progress=False)


@pytest.mark.parametrize("overrides, message", [
    (["autocast=true", "optimizer=mezo"], "autocast: bf16 autocast is for first-order training; for mezo use "
                                          "dtype=bfloat16"),
    (["autocast=true", "dtype=bfloat16"], "autocast runs float32 weights in bf16; use dtype=float32"),
    (["gradient_checkpointing=true", "optimizer=mezo"], "gradient_checkpointing: saves activations"),
    (["gradient_checkpointing=true", "mode=prefix"], "prefix tuning feeds its prefix through the layers' key/value"),
])
def test_first_order_options_are_refused_with_zeroth_order_or_low_precision(overrides, message):
    with pytest.raises(FtlabError, match=message):
        load_config(TrainConfig, None, overrides)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_recomputes_the_blocks_and_keeps_the_gradients(tiny_model_factory, tiny_tokenizer,
                                                                             mode):
    results = {}
    for checkpointing in (False, True):
        model = tiny_model_factory("llama").double()
        calls = []
        model.model.layers[1].mlp.act_fn.register_forward_hook(lambda m, i, o, calls=calls: calls.append(1))
        module, optimizer = _module(model, mode, [f"gradient_checkpointing={str(checkpointing).lower()}"])
        saved = []  # bytes autograd keeps from the forward for the backward

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t
        encoder = Encoder(tiny_tokenizer, SPEC)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            objectives.objective_fn("loss", module, tiny_tokenizer, encoder, EXAMPLES, "cpu")()
        calls.clear()
        results[checkpointing] = (*_grads(module, optimizer, tiny_tokenizer, k=2), len(calls), sum(saved))
    (loss, grads, calls, saved), (loss_ckpt, grads_ckpt, calls_ckpt, saved_ckpt) = results[False], results[True]
    assert calls == 2 and calls_ckpt == 4  # 2 micro-batches; each block runs again in the backward
    assert saved_ckpt < 0.5 * saved  # only the blocks' inputs are kept
    assert loss_ckpt == pytest.approx(loss, rel=1e-12)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-10, atol=1e-14, msg=name)
