"""End to end on the real embedded SmolLM2-135M and the real data of the built-in tasks (slow; CI
runs them). Each task's source is fetched and extracted on first use."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftlab import objectives
from ftlab.config import TrainConfig, load_config
from ftlab.evaluate import evaluate
from ftlab.models import load_model, load_trained
from ftlab.objectives import Encoder
from ftlab.tasks import load_task, make_splits
from ftlab.tasks.registry import builtin_tasks
from ftlab.train import load_run_data, train

pytestmark = pytest.mark.slow


def test_greedy_decode_matches_hf_generate_on_disflqa(smollm2):
    model, tokenizer = smollm2
    spec, examples = load_task("disflqa")
    test = make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=6).test
    prompts = [spec.prompt(e) for e in test]
    batch = Encoder(tokenizer, spec, max_length=768).generation(prompts, max_new_tokens=12)
    ours = objectives.greedy_decode(model, tokenizer, batch, 12)
    for prompt, text in zip(prompts, ours):  # reference: HF generate, one unpadded prompt at a time
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        assert text == want
    f1 = evaluate(model, tokenizer, spec, test, batch_size=3, progress=False).metrics["f1"]
    assert 0.0 < f1 <= 1.0  # the model copies at least some answer words from the context


def test_in_context_prompts_run_on_every_classification_task(smollm2):
    """Every built-in classification task of a default source (the BIG-bench ones need an archive)."""
    model, tokenizer = smollm2
    tasks = [t.spec.name for t in builtin_tasks() if t.source is not None and t.spec.kind == "classification"]
    assert {"sentiment", "boolq", "trec", "siqa", "factual_summary", "corr2cause"} <= set(tasks)
    for task in tasks:
        spec, examples = load_task(task)
        splits = make_splits(examples, seed=0, n_train=50, n_dev=0, n_test=8)
        result = evaluate(model, tokenizer, spec, splits.test, demos=splits.train, k_shot=2, progress=False)
        assert result.metrics["n"] == 8 and all(p in range(len(spec.options)) for p in result.predictions), task


def test_lora_fine_tuning_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    cfg = load_config(TrainConfig, Path(__file__).parents[1] / "src" / "ftlab" / "configs" / "sentiment-lora.yaml", [
        f"output_dir={tmp_path}", "steps=16", "eval_every=8", "checkpoint_every=8", "lr=2e-3",
        "data.n_train=64", "data.n_dev=32", "data.n_test=32", "data.max_length=128", "eval_batch_size=32"])
    results = train(cfg, progress=False)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    # The saved adapter, loaded afresh, reproduces the run's test accuracy exactly.
    model, tokenizer = load_trained("smollm2-135m", tmp_path / "model")
    test = load_run_data(cfg).splits.test
    reloaded = evaluate(model, tokenizer, load_run_data(cfg).spec, test, batch_size=cfg.eval_batch_size,
                        max_length=cfg.data.max_length, progress=False)
    assert reloaded.metrics == results["test"]
    best = load_file(str(tmp_path / "best.safetensors"))
    assert best and all("lora_" in name for name in best)


def test_bf16_scores_agree_with_fp32(smollm2):
    model32, tokenizer = smollm2
    model16, _ = load_model("smollm2-135m", dtype="bfloat16")
    spec, examples = load_task("sentiment")
    test = make_splits(examples, seed=0, n_train=0, n_dev=0, n_test=16).test
    encoder = Encoder(tokenizer, spec)
    batch = encoder.classification(test, [spec.prompt(e) for e in test])
    with torch.no_grad():
        s32 = objectives.option_scores(model32, batch, encoder.option_ids)
        s16 = objectives.option_scores(model16, batch, encoder.option_ids)
    assert s16.dtype == torch.float32  # scores are computed in float32 even for a bf16 model
    assert (s32 - s16).abs().max() < 0.5
