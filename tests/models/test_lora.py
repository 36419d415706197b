"""LoRA: per-architecture default targets, identity at init, clear errors for bad settings."""

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.models import LoraSettings, apply_lora


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer("The movie was great and the acting was good")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch,targets", [("llama", {"q_proj", "v_proj"}), ("gemma3", {"q_proj", "v_proj"}),
                                          ("opt", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
                                          ("gpt_neox", {"query_key_value"})])
def test_default_targets_and_identity_at_init(tiny_model_factory, tiny_tokenizer, arch, targets):
    model = tiny_model_factory(arch)
    before = _logits(model, tiny_tokenizer)
    peft_model = apply_lora(model, LoraSettings(r=4))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert adapted == targets
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # B starts at zero, so the adapted model computes exactly what the base model did.
    assert torch.equal(_logits(peft_model, tiny_tokenizer), before)


def test_explicit_targets_and_dropout(tiny_model, tiny_tokenizer):
    peft_model = apply_lora(tiny_model, LoraSettings(r=2, alpha=4, dropout=0.1,
                                                     target_modules=["k_proj", "mlp.down_proj"]))
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 4 and all(n.endswith(("k_proj", "down_proj")) for n in adapted)
    assert peft_model.peft_config["default"].lora_dropout == 0.1
    assert peft_model.peft_config["default"].lora_alpha == 4


def test_unknown_target_names_the_available_ones(tiny_model):
    with pytest.raises(FtlabError, match=r"\['qproj'\] match no Linear layer.*'o_proj'.*'q_proj'"):
        apply_lora(tiny_model, LoraSettings(target_modules=["qproj"]))


def test_unknown_architecture_asks_for_targets(tiny_model):
    tiny_model.config.model_type = "mystery"
    with pytest.raises(FtlabError, match=r"no default LoRA target modules for model type 'mystery'.*'v_proj'"):
        apply_lora(tiny_model, LoraSettings())


@pytest.mark.parametrize("change,match", [({"r": 0}, "lora.r"), ({"alpha": 0}, "lora.alpha"),
                                          ({"dropout": 1.0}, "lora.dropout"), ({"target_modules": []}, "empty")])
def test_bad_settings(tiny_model, change, match, refused_both_ways):
    refused_both_ways(LoraSettings, change, match, lambda settings: apply_lora(tiny_model, settings))
