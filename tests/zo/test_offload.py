"""Offloaded MeZO (ZO2's design) on a CPU-only machine: compute device = CPU, so each "move" is a
copy into a distinct CPU tensor. The lockstep (doubled-batch) trajectory must be plain exact-mode
MeZO's bit for bit: every unit runs its halves on B rows, exactly the rows and weights (theta +-
eps z, made by the same add_z from the same theta) that MeZO's two separate forwards use, and
the update is MeZO's own. So projected gradients, losses and weights are compared with
``==`` / ``torch.equal`` (bitwise), in float64 and also in bf16."""

import copy

import pytest
import torch

from ftlab import objectives
from ftlab.config import LoraSettings, PrefixSettings
from ftlab.errors import FtlabError
from ftlab.models import prepare_model
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec
from ftlab.zo import MeZO
from ftlab.zo.offload import OffloadedMeZO, check_host_memory, estimate_weight_bytes

SENTENCES = ["the movie was great fun", "a terrible boring film", "great acting and a great story", "it was bad"]
KW = dict(lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1)


def _examples():
    return [Example(id=f"t:{i}", fields={"text": s}, label=i % 2) for i, s in enumerate(SENTENCES)]


def _encoder(tokenizer, options=(" terrible", " great")):
    return Encoder(tokenizer, TaskSpec(name="t", template="{text} It was", options=list(options)))


def _closures(tokenizer, plain, offloaded, options=(" terrible", " great")):
    enc = _encoder(tokenizer, options)
    single = objectives.objective_fn("loss", plain, tokenizer, enc, _examples(), "cpu")
    double = objectives.objective_fn("loss", offloaded, tokenizer, enc, _examples(), "cpu", lockstep=True)
    return torch.no_grad()(single), torch.no_grad()(double)


def _pair(tiny_model_factory, arch, dtype, mode="full"):
    models = []
    for _ in range(2):
        model = tiny_model_factory(arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = prepare_model(model, mode, lora=LoraSettings(r=2), seed=0)
        models.append(model.to(dtype))
    return models


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _run_both(tokenizer, plain, offloaded, steps=4, options=(" terrible", " great"), **extra):
    ref = MeZO(_trainable(plain), exact=True, **KW)
    ref.attach(plain)
    opt = OffloadedMeZO(_trainable(offloaded), model=offloaded, device="cpu", **KW, **extra)
    single, double = _closures(tokenizer, plain, offloaded, options)
    for _ in range(steps):
        want, got = ref.step(single), opt.step(double)
        assert float(got) == float(want)  # L+ bitwise
    return ref, opt


@pytest.mark.parametrize("arch,dtype,mode,offload_non_blocks", [
    ("llama", torch.float64, "full", False),
    ("llama", torch.float64, "full", True),
    ("llama", torch.bfloat16, "full", False),
    ("gpt2", torch.float64, "full", False),
    ("llama", torch.float64, "lora", False),
])
def test_trajectory_equals_exact_mezo_bitwise(tiny_tokenizer, tiny_model_factory, arch, dtype, mode,
                                              offload_non_blocks):
    plain, offloaded = _pair(tiny_model_factory, arch, dtype, mode)
    if mode == "full":  # the tiny models tie the LM head to the input embedding
        assert offloaded.get_output_embeddings().weight is offloaded.get_input_embeddings().weight
    ref, opt = _run_both(tiny_tokenizer, plain, offloaded, options=(" not good at all", " great"),
                         offload_non_blocks=offload_non_blocks)
    assert [r.grads for r in opt.history] == [r.grads for r in ref.history]
    assert all(g != 0 for r in opt.history for g in r.grads)
    assert [(r.seeds, r.lr) for r in opt.history] == [(r.seeds, r.lr) for r in ref.history]
    opt.flush()
    for (name, p), q in zip(plain.named_parameters(), offloaded.parameters()):
        assert torch.equal(p, q), name


def test_generation_loss_trajectory_bitwise(tiny_tokenizer, tiny_model_factory):
    """The answer-NLL objective (generation tasks) in lockstep, too."""
    plain, offloaded = _pair(tiny_model_factory, "llama", torch.float64)
    qa = Encoder(tiny_tokenizer, TaskSpec(name="qa", template="{q}", metric="f1", max_new_tokens=4))
    qs = [Example(id=f"q:{i}", fields={"q": q}, answers=(a,)) for i, (q, a) in
          enumerate([("the movie was", "great"), ("it was a", "story"), ("the film and the", "the acting")])]
    single = objectives.objective_fn("loss", plain, tiny_tokenizer, qa, qs, "cpu")
    double = objectives.objective_fn("loss", offloaded, tiny_tokenizer, qa, qs, "cpu", lockstep=True)
    ref = MeZO(plain.parameters(), exact=True, **KW)
    ref.attach(plain)
    opt = OffloadedMeZO(offloaded.parameters(), model=offloaded, device="cpu", **KW)
    for _ in range(3):
        assert float(ref.step(torch.no_grad()(single))) == float(opt.step(torch.no_grad()(double)))
    assert [r.grads for r in opt.history] == [r.grads for r in ref.history]
    opt.flush()
    for p, q in zip(plain.parameters(), offloaded.parameters()):
        assert torch.equal(p, q)


def test_each_block_moves_once_a_step_and_lives_on_the_cpu_master(tiny_tokenizer, tiny_model_factory):
    plain, offloaded = _pair(tiny_model_factory, "llama", torch.float64)
    opt = OffloadedMeZO(offloaded.parameters(), model=offloaded, device="cpu", **KW)
    blocks = offloaded.model.layers
    masters = {id(p): opt._master[id(p)] for p in blocks.parameters()}
    seen = []
    weight = blocks[1].mlp.down_proj.weight
    blocks[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    _, double = _closures(tiny_tokenizer, plain, offloaded)
    for step in range(3):
        seen.clear()
        opt.step(double)
        assert dict(opt.moves) == {f"model.layers.{i}": step + 1 for i in range(len(blocks))}
        # Two halves ran on copies (+eps, -eps), never on the master itself.
        assert len(seen) == 2 and masters[id(weight)].data_ptr() not in seen
        for p in blocks.parameters():  # between steps: the CPU master
            assert p.data_ptr() == masters[id(p)].data_ptr() and p.device.type == "cpu"
    assert not opt._in and not opt._perturbing
    # A forward outside a step moves each block once more and runs it on an up-to-date copy.
    with torch.no_grad():
        offloaded(input_ids=torch.arange(2, 10)[None], use_cache=False)
    assert dict(opt.moves) == {f"model.layers.{i}": 4 for i in range(len(blocks))}
    # Non-block modules stay resident (on the compute device) by default.
    assert {u.name for u in opt.units if u.offloaded} == {"model.layers.0", "model.layers.1"}


def test_offloaded_non_blocks_move_once_per_use(tiny_tokenizer, tiny_model_factory):
    plain, offloaded = _pair(tiny_model_factory, "llama", torch.float64)
    opt = OffloadedMeZO(offloaded.parameters(), model=offloaded, device="cpu", offload_non_blocks=True, **KW)
    _, double = _closures(tiny_tokenizer, plain, offloaded)
    opt.step(double)
    assert dict(opt.moves) == {"model.layers.0": 1, "model.layers.1": 1, "model.embed_tokens": 1,
                               "model.norm": 1, "lm_head": 1}


def test_forwards_between_steps_see_the_current_weights(tiny_tokenizer, tiny_model_factory):
    """Without flush, an evaluation forward (here greedy decoding, with a KV cache) applies the
    queued updates as it brings each unit in, and gives plain MeZO's outputs."""
    plain, offloaded = _pair(tiny_model_factory, "llama", torch.float64)
    _run_both(tiny_tokenizer, plain, offloaded, steps=3)
    ids = torch.arange(2, 18).view(2, 8)
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids).logits, plain(input_ids=ids).logits)
        enc = _encoder(tiny_tokenizer)
        batch = enc.generation(["the movie was", "a terrible"], max_new_tokens=4)
        assert (objectives.greedy_decode(offloaded, tiny_tokenizer, batch, 4)
                == objectives.greedy_decode(plain, tiny_tokenizer, batch, 4))


def test_replay_with_plain_mezo_gives_the_same_weights(tiny_tokenizer, tiny_model_factory):
    plain, offloaded = _pair(tiny_model_factory, "llama", torch.float64)
    fresh, fresh_offloaded = _pair(tiny_model_factory, "llama", torch.float64)
    _, opt = _run_both(tiny_tokenizer, plain, offloaded, steps=5)
    opt.flush()
    replayer = MeZO(fresh.parameters(), exact=True, **KW)
    other = OffloadedMeZO(fresh_offloaded.parameters(), model=fresh_offloaded, device="cpu", **KW)
    assert other.z_spec() == replayer.z_spec()  # either replays the other's trajectory log
    for record in opt.history:
        assert replayer.draw_seeds() == record.seeds == other.draw_seeds()
        replayer.replay(record)
        other.replay(record)
    other.flush()
    for p, q, r in zip(offloaded.parameters(), fresh.parameters(), fresh_offloaded.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_a_non_finite_loss_skips_the_update(tiny_model_factory):
    model = tiny_model_factory("llama").double()
    base = copy.deepcopy(model)
    opt = OffloadedMeZO(model.parameters(), model=model, device="cpu", **KW)
    loss = opt.step(lambda: torch.tensor([float("nan"), 1.0]))
    assert loss.isnan() and opt.history[-1].lr == 0.0 and opt.history[-1].grads == [0.0]
    opt.flush()
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)


def test_a_failing_forward_leaves_nothing_perturbed(tiny_model_factory):
    model = tiny_model_factory("llama").double()
    base = copy.deepcopy(model)
    opt = OffloadedMeZO(model.parameters(), model=model, device="cpu", **KW)

    def boom():
        model.model.layers[0](torch.zeros(4, 3, 7, dtype=torch.float64))  # wrong width: raises inside
    with pytest.raises(RuntimeError):
        opt.step(boom)
    assert not opt._in and not opt._perturbing
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)


def test_lockstep_objective_halves_equal_the_loss(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory("llama").double()
    for options in ([" terrible", " great"], [" not good at all", " great"]):
        enc = _encoder(tiny_tokenizer, options)
        with torch.no_grad():
            single = objectives.objective_fn("loss", model, tiny_tokenizer, enc, _examples(), "cpu")()
            pair = objectives.objective_fn("loss", model, tiny_tokenizer, enc, _examples(), "cpu", lockstep=True)()
        assert pair.shape == (2,)
        torch.testing.assert_close(pair, single.expand(2), rtol=1e-12, atol=1e-12)
    with pytest.raises(FtlabError, match="loss only"):
        objectives.objective_fn("accuracy", model, tiny_tokenizer, _encoder(tiny_tokenizer), _examples(), "cpu",
                                lockstep=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_perturbations=2), "n_perturbations=1"),
    (dict(one_sided=True), "one_sided=false"),
    (dict(exact=False), "always exact"),
])
def test_unsupported_settings_are_one_line_errors(tiny_model_factory, kwargs, match):
    model = tiny_model_factory("llama")
    with pytest.raises(FtlabError, match=match) as err:
        OffloadedMeZO(model.parameters(), model=model, device="cpu", **kwargs)
    assert "\n" not in str(err.value)


def test_prefix_tuning_and_a_plain_closure_are_refused(tiny_model_factory):
    model = prepare_model(tiny_model_factory("llama"), "prefix", prefix=PrefixSettings(num_tokens=2), seed=0)
    with pytest.raises(FtlabError, match="encloses the decoder blocks"):
        OffloadedMeZO(_trainable(model), model=model, device="cpu")
    model = tiny_model_factory("llama")
    opt = OffloadedMeZO(model.parameters(), model=model, device="cpu")
    with pytest.raises(FtlabError, match="lockstep=True"):
        opt.step(lambda: model(input_ids=torch.arange(2, 10)[None], labels=torch.arange(2, 10)[None]).loss)


def test_host_memory_check_and_estimate(tiny_model_factory):
    with pytest.raises(FtlabError, match="MemAvailable") as err:
        check_host_memory(1 << 62)
    assert "\n" not in str(err.value) and str(err.value).startswith("offload needs")
    check_host_memory(1 << 20)  # a MiB is there
    model = tiny_model_factory("llama")
    want = sum(p.numel() for p in model.parameters()) * 2  # tied weights once
    assert estimate_weight_bytes(model.config, torch.bfloat16) == want


def test_the_config_builds_the_offloaded_form_through_the_zo_registry(tmp_path, tiny_model_factory):
    """offload=true: build_optimizer makes OffloadedMeZO from the same settings as MeZO (the
    registry writes the arguments once); optimizers without an offloaded form are refused."""
    from test_train import _cfg

    from ftlab.optim import build_optimizer

    args = ["optimizer=mezo", "weight_decay=0.1", "lr=2e-3", "zo.eps=1e-2", "zo.chunk_size=128",
            "zo.distribution=rademacher", "seed=7"]
    model = tiny_model_factory("llama")
    opt = build_optimizer(_cfg(tmp_path, *args, "offload=true"), model)
    plain = build_optimizer(_cfg(tmp_path, *args, "zo.exact=true"), tiny_model_factory("llama"))
    assert type(opt) is OffloadedMeZO and opt.model is model and opt.device == torch.device("cpu")
    assert opt.z_spec() == plain.z_spec()
    assert (opt.eps, opt.n, opt.one_sided, opt.exact) == (plain.eps, plain.n, plain.one_sided, plain.exact)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == \
        [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain.param_groups]
    assert opt.draw_seeds() == plain.draw_seeds()
    opt.close()
    with pytest.raises(FtlabError, match=r"^offload=true is implemented for optimizer=mezo \(got zo-adam\)$"):
        build_optimizer(_cfg(tmp_path, "optimizer=zo-adam", "offload=true"), tiny_model_factory("llama"))
