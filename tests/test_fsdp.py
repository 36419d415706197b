"""Sharded MeZO on FSDP2 (gloo, 2 CPU processes): every rank holds half of each parameter, makes
z for its own rows from the global element index, and the run equals a one-process run; its
trajectory replays in one process."""

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftlab.distributed import full_tensor, local_part, shard, shard_model, shutdown
from ftlab.errors import FtlabError

WORLD = 2
VOCAB = 97
BATCH = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def _tiny_llama(hidden=64) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    # Odd sizes on purpose: rows that do not split evenly over the ranks, rows of z (chunk 1000)
    # that straddle the shard boundary.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 6, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


def _run(ids, sharded, optimizer_name="mezo"):
    from ftlab.zo import MeZO, ZOMomentum

    model = _tiny_llama()
    if sharded:
        shard_model(model, "cpu")
    cls = {"mezo": MeZO, "zo-momentum": ZOMomentum}[optimizer_name]
    optimizer = cls(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, n_perturbations=2, seed=3,
                    chunk_size=1000)

    def loss() -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    for _ in range(3):
        optimizer.step(loss)
    local = {n: (local_part(p)[0].numel(), p.numel()) for n, p in model.named_parameters()}
    return {"params": {n: full_tensor(p).clone() for n, p in model.named_parameters()},
            "local": local, "history": optimizer.history}


def _worker(rank, folder, optimizer_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=WORLD)
    try:
        run = _run(torch.stack(shard(list(BATCH), rank, WORLD)), sharded=True, optimizer_name=optimizer_name)
        torch.save(run, f"{folder}/rank{rank}.pt")
    finally:
        shutdown(wait=sys.exc_info()[0] is None)


@pytest.mark.parametrize("optimizer_name", ["mezo", "zo-momentum"])
def test_sharded_run_equals_one_process_and_replays(tmp_path, optimizer_name):
    from ftlab.zo import MeZO, ZOMomentum

    mp.spawn(_worker, args=(str(tmp_path), optimizer_name), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # every rank held about half of each tensor
    for name, (local, total) in ranks[0]["local"].items():
        assert local + ranks[1]["local"][name][0] == total and local <= (total + 1) // 2 + total // 2, name
    assert [s.grads for s in ranks[0]["history"]] == [s.grads for s in ranks[1]["history"]]
    single = _run(BATCH, sharded=False, optimizer_name=optimizer_name)
    torch.testing.assert_close(torch.tensor([s.grads for s in ranks[0]["history"]]),
                               torch.tensor([s.grads for s in single["history"]]), rtol=1e-6, atol=0)
    for name, want in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-9, atol=1e-12, msg=name)
    # the sharded trajectory replays in one process, bit for bit (same z, same arithmetic)
    model = _tiny_llama()
    cls = {"mezo": MeZO, "zo-momentum": ZOMomentum}[optimizer_name]
    replayer = cls(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, n_perturbations=2, seed=3,
                   chunk_size=1000)
    for record in ranks[0]["history"]:
        replayer.replay(record)
    for name, p in model.named_parameters():
        assert torch.equal(p, ranks[0]["params"][name]), name


def test_sharding_needs_a_process_group():
    with pytest.raises(FtlabError, match="torchrun"):
        shard_model(_tiny_llama(), "cpu")
