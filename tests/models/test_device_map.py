"""``device_map`` places the model through accelerate instead of moving it to one device, and
MeZO then perturbs each tensor on its own device (here all on the CPU: this machine has no GPU)."""

import torch

from ftlab.models import load_model
from ftlab.zo import MeZO


def test_device_map_loads_through_accelerate_and_trains(tmp_path, tiny_model_factory, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    tiny_model_factory("llama").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    seen, original = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(str(tmp_path), device_map="auto")
    plain, _ = load_model(str(tmp_path))
    assert seen == ["auto", None]
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids = torch.arange(2, 20)[None]
    opts = [MeZO(m.parameters(), lr=1e-3, eps=1e-3, seed=1) for m in (model, plain)]
    for m, opt in zip((model, plain), opts):
        for _ in range(2):
            opt.step(lambda m=m: m(input_ids=ids, labels=ids).loss)
    assert opts[0].history[-1].grads == opts[1].history[-1].grads
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
