"""Training modes: what each one trains, and save_trained / load_trained round trips."""

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.models import (
    LoraSettings,
    PrefixModel,
    PrefixSettings,
    load_model,
    load_trained,
    prepare_model,
    save_trained,
    trainable_parameters,
    trained_mode,
)


def _base(tmp_path, tiny_model, tiny_tokenizer):
    """The tiny model saved as a local folder, so load_trained can rebuild the base from a name."""
    folder = tmp_path / "base"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def _logits(module, tokenizer):
    batch = tokenizer(["The movie was great", "It was bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_what_each_mode_trains(tiny_model_factory):
    full = prepare_model(tiny_model_factory("llama"), "full")
    assert len(trainable_parameters(full)) == len(list(full.parameters()))
    lora = prepare_model(tiny_model_factory("llama"), "lora", lora=LoraSettings(r=2))
    names = [n for n, _ in trainable_parameters(lora)]
    assert len(names) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)  # A,B x q,v x 2 layers
    prefix = prepare_model(tiny_model_factory("llama"), "prefix", prefix=PrefixSettings(num_tokens=2), seed=1)
    assert isinstance(prefix, PrefixModel)
    assert [n for n, _ in trainable_parameters(prefix)] == [
        "prefix_keys.0", "prefix_keys.1", "prefix_values.0", "prefix_values.1"]
    with pytest.raises(FtlabError, match="unknown training mode 'adapter'"):
        prepare_model(tiny_model_factory("llama"), "adapter")


@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
def test_save_and_load_trained_round_trip(tmp_path, tiny_model, tiny_tokenizer, mode):
    base_dir = _base(tmp_path, tiny_model, tiny_tokenizer)
    model, tokenizer = load_model(base_dir)
    module = prepare_model(model, mode, lora=LoraSettings(r=2), prefix=PrefixSettings(num_tokens=3), seed=0)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for _, p in trainable_parameters(module):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = _logits(module, tokenizer)
    assert not torch.allclose(trained, _logits(tiny_model, tiny_tokenizer))
    save_trained(module, tokenizer, tmp_path / "out")
    assert trained_mode(tmp_path / "out") == mode
    loaded, loaded_tokenizer = load_trained(base_dir, tmp_path / "out")
    assert not loaded.training
    torch.testing.assert_close(_logits(loaded, loaded_tokenizer), trained, rtol=0, atol=1e-6)


def test_load_trained_rejects_other_folders(tmp_path):
    with pytest.raises(FtlabError, match="not a folder written by save_trained"):
        load_trained("smollm2-135m", tmp_path)


def test_lora_adapter_for_another_model_is_rejected(tmp_path, tiny_model_factory, tiny_tokenizer):
    module = prepare_model(tiny_model_factory("llama"), "lora", lora=LoraSettings(r=2))
    save_trained(module, tiny_tokenizer, tmp_path / "out")
    other = _base(tmp_path, tiny_model_factory("gpt2"), tiny_tokenizer)
    with pytest.raises(FtlabError, match="LoRA adapter does not fit"):
        load_trained(other, tmp_path / "out")
