"""First-order data parallelism (DDP) and Local SGD under 2 gloo processes on the CPU, through
``ftlab.train``: the same weights, losses and metrics as one process on the global batch
(float64 tiny Llama, so only the order of the reductions separates them), Local SGD with H = 1
equal to synchronous SGD, Local SGD with H = 2 equal to a naive two-replica simulation, resume
after a kill, evaluation split over the ranks, and the bad inputs."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from ftlab.distributed import shutdown
from ftlab.errors import FtlabError

WORLD = 2
COMMON = ["data.template='{text} It was'", "data.options=[' terrible', ' great']", "data.n_train=16",
          "data.n_dev=7", "data.n_test=9", "lora.r=2", "steps=4", "batch_size=4", "eval_every=2",
          "checkpoint_every=2", "eval_batch_size=4"]
# name -> overrides. Each runs on 2 ranks and (except those only compared with another) in one process.
SCENARIOS = {
    "lora-sgd": ["mode=lora", "optimizer=sgd", "lr=0.5", "momentum=0.9"],
    "prefix-adamw": ["mode=prefix", "prefix.num_tokens=2", "optimizer=adamw", "lr=1e-2"],
    "full-sgd-accum": ["mode=full", "optimizer=sgd", "lr=0.05", "grad_accum=2"],
    "fsdp-lora-sgd": ["fsdp=true", "mode=lora", "optimizer=sgd", "lr=0.5", "momentum=0.9"],
    "fsdp-full-adamw": ["fsdp=true", "mode=full", "optimizer=adamw", "lr=1e-3", "grad_accum=2"],
    "sync-noclip": ["mode=lora", "optimizer=sgd", "lr=0.5", "momentum=0.9", "max_grad_norm=null"],
    "full-adamw": ["mode=full", "optimizer=adamw", "lr=1e-3", "grad_accum=2"],  # one process only
    "local-h1": ["mode=lora", "optimizer=sgd", "lr=0.5", "momentum=0.9", "max_grad_norm=null",
                 "local_sgd.period=1"],
    "local-h2": ["mode=lora", "optimizer=sgd", "lr=0.5", "max_grad_norm=null", "local_sgd.period=2",
                 "steps=5", "eval_every=3"],
    "local-switch": ["mode=lora", "optimizer=sgd", "lr=0.5", "momentum=0.9", "max_grad_norm=null",
                     "local_sgd.period=2", "local_sgd.switch_step=1", "steps=6", "checkpoint_every=3"],
}
SINGLE = ["lora-sgd", "prefix-adamw", "full-sgd-accum", "sync-noclip", "full-adamw"]
KILLED = {"lora-sgd": 3, "local-switch": 4}  # also run killed after this step, then resumed


class Killed(Exception):
    pass


def _load(base: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base).double().eval(), AutoTokenizer.from_pretrained(base)


def _train(folder: Path, name: str, out: str, kill_at: int | None = None) -> dict:
    from ftlab.config import TrainConfig, load_config
    from ftlab.train import train

    cfg = load_config(TrainConfig, None, [f"model={folder / 'base'}", f"data.task={folder / 'task.jsonl'}",
                                          *COMMON, *SCENARIOS[name], f"output_dir={folder / out}"])

    def callback(step, record):
        if step == kill_at:
            raise Killed
    try:
        return train(cfg, progress=False, model_and_tokenizer=_load(str(folder / "base")), callback=callback)
    except Killed:
        return train(cfg, progress=False, model_and_tokenizer=_load(str(folder / "base")))


def _fsdp_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg-fsdp", rank=rank, world_size=WORLD)
    try:
        _train(folder, "fsdp-lora-sgd", "dp-fsdp-lora-sgd")
        _train(folder, "fsdp-full-adamw", "dp-fsdp-full-adamw", kill_at=3)  # resumed from a sharded checkpoint
    finally:
        shutdown(wait=sys.exc_info()[0] is None)


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=WORLD)
    try:
        import ftlab.parallel as parallel_module  # where the loop evaluates

        seen = []  # examples each evaluation of this rank covered
        evaluate = parallel_module.evaluate

        def counting(module, tokenizer, spec, examples, **kw):
            seen.append(len(examples))
            return evaluate(module, tokenizer, spec, examples, **kw)
        parallel_module.evaluate = counting
        for name in SCENARIOS:
            if name != "full-adamw" and not name.startswith("fsdp"):
                _train(folder, name, f"dp-{name}")
        for name, step in KILLED.items():
            _train(folder, name, f"dp-{name}-killed", kill_at=step)
        errors = {}
        for key, overrides in {"batch": ["batch_size=3"], "accum": ["grad_accum=2", "batch_size=6"]}.items():
            try:
                from ftlab.config import TrainConfig, load_config
                from ftlab.train import train

                cfg = load_config(TrainConfig, None, [f"model={folder / 'base'}", *overrides,
                                                      f"output_dir={folder / ('bad-' + key)}"])
                train(cfg, progress=False, model_and_tokenizer=_load(str(folder / "base")))
            except FtlabError as e:
                errors[key] = str(e)
        (folder / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "errors": errors}))
    finally:
        shutdown(wait=sys.exc_info()[0] is None)


def _make_folder(folder: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    # tests/conftest.py's tiny Llama (its fixtures are per test; this folder is shared by the module)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    rng = random.Random(0)
    rows = []
    for i in range(32):  # prompts of different lengths: batches are padded
        words = rng.sample(["the", "movie", "story", "was", "a", "film", "and", "it"], rng.randint(2, 6))
        rows.append({"text": " ".join(words + [["terrible", "great"][i % 2]]), "label": i % 2})
    (folder / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer) -> Path:
    """Every scenario on 2 gloo processes (one spawn) and, where compared, in one process."""
    folder = tmp_path_factory.mktemp("ddp")
    _make_folder(folder, tiny_tokenizer)
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD)
    for name in SINGLE:
        _train(folder, name, f"one-{name}")
    return folder


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "trainable.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, rtol: float = 1e-9) -> None:
    """Same final weights, best weights, losses, dev metrics and results, up to float64 rounding."""
    for f in (_weights, lambda r: load_file(str(r / "best.safetensors"))):
        got, want = f(a), f(b)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-12, msg=name)
    ma, mb = _metrics(a), _metrics(b)
    assert [(r["step"], r["split"]) for r in ma] == [(r["step"], r["split"]) for r in mb]
    for x, y in zip(ma, mb):
        assert x.get("accuracy") == y.get("accuracy") and x.get("n") == y.get("n")
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-9)
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert ra["test"].pop("loss") == pytest.approx(rb["test"].pop("loss"), rel=1e-9)
    assert ra == rb


@pytest.mark.parametrize("name", ["lora-sgd", "prefix-adamw", "full-sgd-accum"])
def test_two_processes_equal_one_on_the_global_batch(runs, name):
    _assert_same_run(runs / f"dp-{name}", runs / f"one-{name}")
    train = [r for r in _metrics(runs / f"dp-{name}") if r["split"] == "train"]
    assert [r["comm_rounds"] for r in train] == [1, 2, 3, 4]  # one gradient all-reduce a step
    assert "comm_rounds" not in _metrics(runs / f"one-{name}")[1]


@pytest.mark.slow
def test_fsdp_first_order_equals_one_process(runs):
    """FSDP2: every rank holds half of each tensor, gradients reduce-scattered; the saved weights
    (gathered whole), metrics and results equal one process's on the global batch, also for a
    run killed after step 3 and resumed from its sharded checkpoint (whole AdamW state)."""
    mp.spawn(_fsdp_worker, args=(str(runs),), nprocs=WORLD)
    _assert_same_run(runs / "dp-fsdp-lora-sgd", runs / "one-lora-sgd")
    _assert_same_run(runs / "dp-fsdp-full-adamw", runs / "one-full-adamw")


def test_the_weights_moved(runs):
    dev = [r for r in _metrics(runs / "dp-lora-sgd") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [0, 2, 4]
    assert len({r["loss"] for r in dev}) == 3  # training changed the dev loss at every evaluation


def test_local_sgd_with_h1_equals_synchronous_sgd(runs):
    _assert_same_run(runs / "dp-local-h1", runs / "one-sync-noclip")
    train = [r for r in _metrics(runs / "dp-local-h1") if r["split"] == "train"]
    assert [(r["comm_rounds"], r["H"]) for r in train] == [(1, 1), (2, 1), (3, 1), (4, 1)]


def test_local_sgd_with_h2_equals_two_replicas_averaged_every_two_steps(runs, tiny_tokenizer):
    """A naive reference: two copies of the model, each taking plain SGD steps on its half of
    every global batch, their trainable tensors averaged after steps 2 and 4 and after the last (5)."""
    from ftlab import objectives
    from ftlab.config import TrainConfig, load_config
    from ftlab.distributed import shard
    from ftlab.models import trainable_parameters
    from ftlab.objectives import Encoder
    from ftlab.train import batch_indices, build_trainer, load_run_data

    cfg = load_config(TrainConfig, None, [f"model={runs / 'base'}", f"data.task={runs / 'task.jsonl'}",
                                          *COMMON, *SCENARIOS["local-h2"]])
    data = load_run_data(cfg)
    replicas = []
    for _ in range(WORLD):
        module, _, _ = build_trainer(cfg, _load(str(runs / "base"))[0])
        module.train()
        params = [p for _, p in trainable_parameters(module)]
        replicas.append((module, params, torch.optim.SGD(params, lr=cfg.lr)))
    encoder = Encoder(tiny_tokenizer, data.spec, max_length=cfg.data.max_length)
    for step in range(cfg.steps):
        batch = batch_indices(len(data.splits.train), cfg.batch_size, cfg.seed, step)
        for rank, (module, _params, opt) in enumerate(replicas):
            examples = [data.splits.train[i] for i in shard(batch, rank, WORLD)]
            opt.zero_grad()
            objectives.objective_fn("loss", module, tiny_tokenizer, encoder, examples, "cpu")().backward()
            opt.step()
        if step + 1 in (2, 4, 5):
            with torch.no_grad():
                for tensors in zip(*(params for _, params, _ in replicas)):
                    mean = sum(t.clone() for t in tensors) / WORLD
                    for t in tensors:
                        t.copy_(mean)
    got = _weights(runs / "dp-local-h2")
    for name, p in trainable_parameters(replicas[0][0]):
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)
    train = [r for r in _metrics(runs / "dp-local-h2") if r["split"] == "train"]
    assert [r["comm_rounds"] for r in train] == [0, 1, 1, 2, 3]  # averages after steps 2, 4, 5 (the end)


def test_post_local_switch_counts_synchronous_steps(runs):
    train = [r for r in _metrics(runs / "dp-local-switch") if r["split"] == "train"]
    # step 1 synchronous (a gradient all-reduce), then rounds of H = 2: averages after 3 and 5, and 6 (the end)
    assert [r["comm_rounds"] for r in train] == [1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("name", list(KILLED))
def test_a_killed_run_resumes_to_the_same_weights(runs, name):
    """Killed after a step past a checkpoint, rerun: the uninterrupted run's weights and metrics
    (Local SGD: every rank's own weights and momentum come back from the checkpoint)."""
    _assert_same_run(runs / f"dp-{name}-killed", runs / f"dp-{name}", rtol=0)


def test_evaluation_is_split_over_the_ranks(runs):
    seen = [json.loads((runs / f"rank{r}.json").read_text())["seen"] for r in range(WORLD)]
    assert len(seen[0]) == len(seen[1]) > 0
    # 7 dev examples: 4 + 3; 9 test examples: 5 + 4. Never the whole split on one rank.
    assert {a + b for a, b in zip(*seen)} == {7, 9}
    assert all(max(a, b) <= 5 for a, b in zip(*seen))


def test_bad_batches_are_refused_in_one_line(runs):
    errors = json.loads((runs / "rank0.json").read_text())["errors"]
    assert errors["batch"] == ("batch_size=3 (the global batch) cannot be split evenly over 2 processes; "
                               "use a multiple of 2")
    assert "cannot be cut into grad_accum=2" in errors["accum"]
