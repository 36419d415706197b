"""LoRA warm-up: per-epoch checkpoints with AdamW moments by name, mean lr, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ftlab.errors import FtlabError
from ftlab.models import trainable_parameters
from ftlab.optim import lr_factor
from ftlab.select.data import InstructionExample
from ftlab.select.warmup import WarmupSettings, list_checkpoints, load_adam_state, run_warmup, warmup_subset

from less_fixtures import tiny_lora

WORDS = ["great", "terrible", "good", "bad", "movie", "film", "story"]


def _pool(n: int = 24) -> list[InstructionExample]:
    return [InstructionExample(f"p:{i + 1}", ({"role": "user", "content": f"The {WORDS[i % 7]} was"},),
                               f" {WORDS[(i * 3) % 7]}", "t", "t") for i in range(n)]


SETTINGS = WarmupSettings(percentage=0.5, epochs=3, lr=1e-2, batch_size=5, schedule="linear", warmup_ratio=0.2)


def test_subset_is_seeded_and_sized():
    pool = _pool(40)
    a, b = warmup_subset(pool, 0.25, seed=0), warmup_subset(pool, 0.25, seed=0)
    assert a == b and len(a) == 10 and len({ex.id for ex in a}) == 10
    assert warmup_subset(pool, 0.25, seed=1) != a
    with pytest.raises(FtlabError, match="percentage"):
        warmup_subset(pool, 0.0, seed=0)


def test_checkpoints_hold_adam_state_by_name_and_mean_lr(tmp_path, tiny_model, tiny_tokenizer):
    module = tiny_lora(tiny_model)
    ckpts = run_warmup(module, tiny_tokenizer, _pool(), SETTINGS, tmp_path, max_length=32, progress=False)
    assert [c.epoch for c in ckpts] == [1, 2, 3]
    names = [n for n, _ in trainable_parameters(module)]
    per_epoch, total = 3, 9  # 12 examples in batches of 5
    for c in ckpts:
        moments = load_adam_state(c.path)
        assert sorted(moments) == sorted(names)
        for m, v in moments.values():
            assert m.abs().sum() > 0 and (v >= 0).all() and v.abs().sum() > 0
        lrs = [SETTINGS.lr * lr_factor("linear", s, total, round(0.2 * total))
               for s in range((c.epoch - 1) * per_epoch, c.epoch * per_epoch)]
        assert c.mean_lr == pytest.approx(sum(lrs) / len(lrs))
        state = json.loads((c.path / "state.json").read_text())
        assert state["betas"] == [0.9, 0.999] and state["step"] == c.epoch * per_epoch
    # the last checkpoint holds the module's final LoRA tensors
    final = load_file(str(ckpts[-1].path / "trainable.safetensors"))
    for n, p in trainable_parameters(module):
        torch.testing.assert_close(final[n], p.detach(), rtol=0, atol=0)
    # the moments are AdamW's own, matched by name (not by position)
    second = tiny_lora(tiny_model.__class__(tiny_model.config).eval())
    assert sorted(load_adam_state(ckpts[0].path)) == sorted(n for n, _ in trainable_parameters(second))


def test_resume_after_a_kill_reaches_the_same_weights(tmp_path, tiny_model_factory, tiny_tokenizer, monkeypatch):
    straight = tiny_lora(tiny_model_factory())
    run_warmup(straight, tiny_tokenizer, _pool(), SETTINGS, tmp_path / "a", max_length=32, progress=False)

    import ftlab.select.warmup as warmup

    real_save, saves = warmup._save, []

    def save_then_die(path, *args):
        real_save(path, *args)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(warmup, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_warmup(tiny_lora(tiny_model_factory()), tiny_tokenizer, _pool(), SETTINGS, tmp_path / "b",
                   max_length=32, progress=False)
    monkeypatch.setattr(warmup, "_save", real_save)
    assert [c.epoch for c in list_checkpoints(tmp_path / "b")] == [1, 2]
    resumed = tiny_lora(tiny_model_factory())
    ckpts = run_warmup(resumed, tiny_tokenizer, _pool(), SETTINGS, tmp_path / "b", max_length=32, progress=False)
    assert [c.epoch for c in ckpts] == [1, 2, 3]
    for (n, p), (_, q) in zip(trainable_parameters(straight), trainable_parameters(resumed)):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    a, b = load_adam_state(tmp_path / "a" / "epoch-3"), load_adam_state(tmp_path / "b" / "epoch-3")
    for n in a:
        torch.testing.assert_close(a[n][1], b[n][1], rtol=0, atol=0)


def test_other_settings_refuse_to_resume(tmp_path, tiny_model_factory, tiny_tokenizer):
    one = WarmupSettings(percentage=0.5, epochs=1, lr=1e-2, batch_size=5)
    run_warmup(tiny_lora(tiny_model_factory()), tiny_tokenizer, _pool(), one, tmp_path, max_length=32, progress=False)
    with pytest.raises(FtlabError, match="holds a warm-up written with other settings.*lr"):
        run_warmup(tiny_lora(tiny_model_factory()), tiny_tokenizer, _pool(),
                   WarmupSettings(percentage=0.5, epochs=1, lr=1e-3, batch_size=5), tmp_path, max_length=32,
                   progress=False)
