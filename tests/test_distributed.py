"""Data-parallel MeZO on CPU (gloo, 2 processes): the same weights as one process that sees the
whole global batch, both for the optimizer alone and for ``ftlab train`` under ``torchrun``."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from ftlab.distributed import init_from_env, is_main, shard, shutdown
from ftlab.errors import FtlabError
from ftlab.models import trainable_parameters
from ftlab.train import replay_run
from ftlab.zo.trajectory import TrajectoryLog

WORLD = 2
VOCAB = 97
# A fixed global batch of equal-length rows (no padding): every shard then holds the same number
# of tokens, so the mean of the shards' mean losses is the global batch's mean loss.
BATCH = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def _tiny_llama() -> torch.nn.Module:
    """The conftest's tiny llama config (its fixtures cannot cross into spawned processes), in
    float64 so only the order of the loss reduction separates the runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


def _mezo_run(ids: torch.Tensor) -> dict:
    """A few MeZO steps (two seeds a step, weight decay) on the batch ``ids``."""
    from ftlab.zo import MeZO

    model = _tiny_llama()
    optimizer = MeZO(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, n_perturbations=2, seed=3)

    def loss() -> torch.Tensor:  # next-token cross-entropy, kept in float64 (HF's loss is float32)
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    for _ in range(3):
        optimizer.step(loss)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": [s.grads for s in optimizer.history], "losses": [s.loss for s in optimizer.history]}


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=WORLD)
    try:
        assert init_from_env("cpu") == (rank, WORLD) and is_main() == (rank == 0)
        run = _mezo_run(torch.stack(shard(list(BATCH), rank, WORLD)))
        torch.save(run, f"{folder}/rank{rank}.pt")
    finally:
        shutdown(wait=sys.exc_info()[0] is None)


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _mezo_run(BATCH)
    for name, want in single["params"].items():
        # The ranks apply the same all-reduced scalars, so they stay bitwise identical ...
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        # ... but (L0 + L1) / 2 rounds differently from the loss of the whole batch, so they
        # match one process only up to that rounding (float64 here: tight).
        torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-9, atol=1e-12)
    assert ranks[0]["grads"] == ranks[1]["grads"]
    torch.testing.assert_close(torch.tensor(ranks[0]["grads"]), torch.tensor(single["grads"]),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], rtol=1e-12, atol=0)


def test_shard_slices_the_global_batch():
    batch = list(range(8))
    assert [shard(batch, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert shard(batch, 0, 1) == batch
    with pytest.raises(FtlabError, match="batch_size=6 .* over 4 processes; use a multiple of 4"):
        shard(list(range(6)), 1, 4)


def test_single_process_without_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert init_from_env("cpu") == (0, 1) and is_main()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["fsdp=true"], ["fsdp=true", "mode=full", "optimizer=zo-momentum",
                                                       "grad_accum=2", "lr=1e-4"],
                                   # the new estimators average their losses over ranks the same way
                                   ["optimizer=fzoo", "zo.distribution=rademacher", "zo.n_perturbations=4",
                                    "lr=1e-3"],
                                   ["optimizer=lozo-m", "zo.rank=2", "zo.refresh_every=3"],
                                   ["optimizer=zo-guided", "zo.pool_size=4"]],
                         ids=["dp", "fsdp", "fsdp-full-zo-momentum", "fzoo", "lozo-m", "zo-guided"])
def test_torchrun_train_matches_single_process(tmp_path, tiny_model_factory, tiny_tokenizer, extra):
    """Data parallel, and sharded with FSDP2 (``fsdp=true``: every rank holds half of each
    parameter), against one process on the whole batch (sharding is not part of the config the
    single run checks, so the same folder layout, logs and saved model must come out)."""
    base = tmp_path / "base"
    tiny_model_factory("llama").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    rng = random.Random(0)
    rows = []
    for i in range(32):
        words = rng.sample(["the", "movie", "story", "was", "a", "film", "and", "it"], 4)
        rows.append({"text": " ".join(words + [["terrible", "great"][i % 2]]), "label": i % 2})
    task = tmp_path / "reviews.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model={base}", f"data.task={task}", "data.template='{text} It was'",
                 "data.options=[' terrible', ' great']", "data.n_train=16", "data.n_dev=8", "data.n_test=8",
                 "optimizer=mezo", "mode=lora", "lora.r=2", "zo.eps=1e-2", "lr=1e-2", "steps=6",
                 "batch_size=4", "eval_every=3", "checkpoint_every=2", "eval_batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    single_extra = [o for o in extra if not o.startswith("fsdp")]
    dp = subprocess.run([*torchrun, "-m", "ftlab.cli", "train", *overrides, *extra, f"output_dir={tmp_path / 'dp'}"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert dp.returncode == 0, dp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "ftlab.cli", "train", *overrides, *single_extra,
                          f"output_dir={tmp_path / 'single'}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    dp_dir, one_dir = tmp_path / "dp", tmp_path / "single"
    assert dp.stdout.count('"best_step"') == 1  # results printed by rank 0 only
    assert sorted(p.name for p in dp_dir.iterdir()) == sorted(p.name for p in one_dir.iterdir())
    lines = [json.loads(line) for line in (dp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # written once
    assert [r["step"] for r in lines if r["split"] == "dev"] == [0, 3, 6]
    dp_steps, one_steps = list(TrajectoryLog(dp_dir).steps()), list(TrajectoryLog(one_dir).steps())
    assert [s for s, _ in dp_steps] == list(range(6))
    assert [r.seeds for _, r in dp_steps] == [r.seeds for _, r in one_steps]
    # float32 losses: the mean of the shards' losses rounds differently from the batch's loss.
    torch.testing.assert_close([r.grads for _, r in dp_steps], [r.grads for _, r in one_steps],
                               rtol=1e-4, atol=1e-4)
    results, want = (json.loads((d / "results.json").read_text()) for d in (dp_dir, one_dir))
    assert results["test"].pop("loss") == pytest.approx(want["test"].pop("loss"), rel=1e-5)  # float32 rounding
    assert results == want
    saved = "model/adapter_model.safetensors" if "mode=full" not in extra else "model/model.safetensors"
    for f in ["best.safetensors", saved]:  # the best step's weights
        got, want = load_file(str(dp_dir / f)), load_file(str(one_dir / f))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    # The weights after the last step (the best step may be an earlier one), rebuilt from the logs.
    start = dict(trainable_parameters(replay_run(dp_dir, steps=0)[0]))
    final_dp, final_one = replay_run(dp_dir)[0], replay_run(one_dir)[0]
    for (name, got), (_, want) in zip(trainable_parameters(final_dp), trainable_parameters(final_one)):
        assert not torch.equal(got, start[name]), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
