"""The MeZO variants (momentum, Adam, sign, sparse) against naive float64 references with z
materialised, bitwise replay (buffers included), Sparse MeZO's mask, learning, and train()."""

import copy
import math

import pytest
import torch
from reference import directions, f32, projected_grads
from test_train import _cfg

from ftlab.config import ZOSettings
from ftlab.errors import FtlabError
from ftlab.optim import build_optimizer
from ftlab.zo import ZO_OPTIMIZERS, SparseMeZO, ZOAdam, ZOMomentum, ZOSignSGD, build_zo_optimizer

VARIANTS = {"zo-momentum": (ZOMomentum, {"momentum": 0.8}), "zo-adam": (ZOAdam, {"betas": (0.8, 0.9)}),
            "zo-sign": (ZOSignSGD, {}), "sparse-mezo": (SparseMeZO, {"sparsity": 0.6})}
LR = {"zo-momentum": 1e-2, "zo-adam": 1e-3, "zo-sign": 1e-2, "sparse-mezo": 1e-2}


# -- naive references: buffers as dicts of whole float64 tensors --------------------------------
class RefSGD:
    """theta -= lr * d, d = (1/n) sum_k g_k z_k (also Sparse MeZO, whose z is masked)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def grads(self, grads):
        return grads

    def delta(self, i, d):
        return d


class RefSign(RefSGD):
    def grads(self, grads):
        return [math.copysign(1.0, g) if g else 0.0 for g in grads]


class RefMomentum(RefSGD):
    def __init__(self, momentum):
        self.beta, self.m = momentum, {}

    def delta(self, i, d):
        self.m[i] = self.beta * self.m.get(i, 0.0) + d
        return self.m[i]


class RefAdam(RefSGD):
    def __init__(self, betas, adam_eps=1e-8):
        self.betas, self.adam_eps, self.m, self.v, self.t = betas, adam_eps, {}, {}, {}

    def delta(self, i, d):
        b1, b2 = self.betas
        self.t[i] = t = self.t.get(i, 0) + 1
        self.m[i] = b1 * self.m.get(i, 0.0) + (1 - b1) * d
        self.v[i] = b2 * self.v.get(i, 0.0) + (1 - b2) * d * d
        return (self.m[i] / (1 - b1 ** t)) / ((self.v[i] / (1 - b2 ** t)).sqrt() + self.adam_eps)


REFERENCES = {"zo-momentum": RefMomentum, "zo-adam": RefAdam, "zo-sign": RefSign, "sparse-mezo": RefSGD}


def small_magnitude_mask(p, sparsity):
    """The Sparse MeZO mask as documented: |theta| <= the k-th smallest |theta|, k = sparsity * n."""
    k = max(1, round(sparsity * p.numel()))
    return p.abs() <= p.abs().flatten().kthvalue(k).values


def reference_step(name, ref, params, loss_fn, seeds, lr, eps, wd_of, chunk, one_sided, generator):
    lr = f32(lr)
    sparsity = VARIANTS[name][1].get("sparsity")
    masks = [small_magnitude_mask(p, sparsity) for p in params] if sparsity else None
    zs = directions(params, seeds, chunk, generator=generator, masks=masks)
    grads = projected_grads(params, loss_fn, zs, eps, one_sided)
    used = ref.grads(grads)
    with torch.no_grad():
        for i, p in enumerate(params):
            decay = lr * wd_of(p) * (masks[i].to(p.dtype) if masks else 1.0)  # (bool * float: float32)
            d = sum(g * z[i] for g, z in zip(used, zs)) / len(seeds)
            p.sub_(decay * p)
            p.sub_(lr * ref.delta(i, d))
    return grads


def _ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("the movie was great and the story was good")["input_ids"]])


def _groups(model, wd):
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("n,one_sided,wd,exact,generator", [
    (1, False, 0.0, False, "torch"), (3, False, 0.1, False, "table"), (2, True, 0.1, False, "torch"),
    (2, False, 0.1, True, "table"), (3, False, 0.1, False, "strided"), (2, True, 0.1, True, "strided")])
def test_matches_a_naive_reference(tiny_model_factory, tiny_tokenizer, name, n, one_sided, wd, exact, generator):
    model = tiny_model_factory("llama").double()
    ref_model = copy.deepcopy(model)
    ids = _ids(tiny_tokenizer)
    chunk = 1000  # several chunks per matrix
    cls, kwargs = VARIANTS[name]
    opt = cls(_groups(model, wd), lr=LR[name], eps=1e-3, n_perturbations=n, one_sided=one_sided,
              generator=generator, seed=7, chunk_size=chunk, exact=exact, **kwargs)
    opt.attach(model)
    ref_params = [q for g in _groups(ref_model, wd) for q in g["params"]]  # the optimizer's order
    decayed = {id(q) for q in ref_params if q.ndim >= 2}
    ref = REFERENCES[name](**{k: v for k, v in kwargs.items() if k != "sparsity"})

    def loss(m):
        return lambda: float(m(input_ids=ids, labels=ids).loss)

    for _ in range(3):
        opt.step(loss(model))
        record = opt.history[-1]
        want = reference_step(name, ref, ref_params, loss(ref_model), record.seeds, LR[name], 1e-3,
                              lambda p: wd if id(p) in decayed else 0.0, chunk, one_sided, generator)
        assert record.grads == pytest.approx(want, rel=1e-6, abs=1e-9)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    buffers = {"zo-momentum": {"momentum_buffer": "m"}, "zo-adam": {"exp_avg": "m", "exp_avg_sq": "v"}}.get(name, {})
    assert bool(opt.state) == bool(buffers)  # the stateless variants keep no state
    for i, (p, q) in enumerate(zip(opt_params, ref_params)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        for buffer, attribute in buffers.items():
            torch.testing.assert_close(opt.state[p][buffer], getattr(ref, attribute)[i], rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_replay_is_bitwise_buffers_included(tiny_model_factory, name, exact):
    model = tiny_model_factory("llama")  # float32: in-place moves round, replay must round alike
    base = copy.deepcopy(model)
    ids = torch.arange(2, 30)[None]
    cls, kwargs = VARIANTS[name]
    common = dict(lr=LR[name] / 10, eps=1e-3, n_perturbations=2, exact=exact, **kwargs)
    opt = cls(_groups(model, 0.01), seed=3, **common)
    opt.attach(model)
    for _ in range(4):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    replayer = cls(_groups(base, 0.01), seed=999, **common)
    for record in opt.history:
        replayer.replay(record)
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)
    mine = [p for g in opt.param_groups for p in g["params"]]
    theirs = [p for g in replayer.param_groups for p in g["params"]]
    for p, q in zip(mine, theirs):
        assert opt.state[p].keys() == replayer.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(replayer.state[q][key])), key


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", ["zo-momentum", "zo-adam"])
def test_a_skipped_step_leaves_weights_and_buffers_alone(tiny_model_factory, name, exact):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 30)[None]
    cls, kwargs = VARIANTS[name]
    opt = cls(model.parameters(), lr=1e-3, eps=1e-3, seed=0, exact=exact, **kwargs)
    opt.attach(model)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    assert math.isnan(float(opt.step(lambda: torch.tensor(float("nan")))))
    for p, w in zip(model.parameters(), weights):  # in place, +eps -2eps +eps rounds in float32
        torch.testing.assert_close(p, w, rtol=0, atol=0 if exact else 1e-6)
    after = opt.state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(after[i][k]), torch.as_tensor(v))
               for i in state for k, v in state[i].items())


@pytest.mark.parametrize("exact", [False, True])
def test_sparse_mezo_leaves_large_weights_untouched(tiny_model_factory, exact):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 30)[None]
    opt = SparseMeZO(_groups(model, 0.1), lr=1e-2, eps=1e-2, sparsity=0.75, n_perturbations=2, exact=exact, seed=1)
    opt.attach(model)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        masks = [small_magnitude_mask(p, 0.75) for p in before]
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        for p, old, mask in zip(model.parameters(), before, masks):
            assert torch.equal(p[~mask], old[~mask])  # frozen: bit for bit, weight decay included
            assert (p[mask] != old[mask]).float().mean() > 0.99  # trained
            assert abs(mask.float().mean() - 0.75) < 0.01 or p.numel() < 100


def test_sparse_threshold_from_a_sample_is_deterministic_and_close():
    p = torch.nn.Parameter(torch.randn(200, 500))
    opt = SparseMeZO([p], sparsity=0.75, threshold_sample=4000)
    h = opt._threshold(0, p)
    assert h == opt._threshold(0, p)  # the same positions every time: a replay finds the same h
    assert abs((p.abs() <= h).float().mean() - 0.75) < 0.03
    assert h != SparseMeZO([p], sparsity=0.75)._threshold(0, p)  # the exact quantile is another value


@pytest.mark.parametrize("name", VARIANTS)  # mezo: see test_mezo.py
def test_each_variant_lowers_a_loss(tiny_model_factory, name):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 40)[None]
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    start = float(closure().detach())
    lr = {"zo-momentum": 2e-4, "zo-adam": 1e-3, "zo-sign": 2e-3, "sparse-mezo": 3e-3}[name]
    opt = build_zo_optimizer(name, model.parameters(), lr, ZOSettings(), seed=0)
    for _ in range(150):
        opt.step(closure)
    assert float(closure().detach()) < start - 0.05


def test_buffers_stay_float32_through_state_dict(tiny_model_factory):
    model = tiny_model_factory("llama").to(torch.bfloat16)
    ids = torch.arange(2, 20)[None]
    opt = ZOAdam(model.parameters(), lr=1e-3, eps=1e-2, seed=2)  # bf16: exact mode
    opt.attach(model)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    fresh = ZOAdam(model.parameters(), lr=1e-3, eps=1e-2, seed=5)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
        assert fresh.state[p]["step"] == 1


def test_optimizer_names_and_bad_settings(tmp_path, tiny_model):
    for name in ("mezo", "zo-momentum", "zo-adam", "zo-sign", "sparse-mezo"):  # every name: test_registry.py
        assert type(build_optimizer(_cfg(tmp_path, f"optimizer={name}"), tiny_model)) is ZO_OPTIMIZERS[name].cls
    with pytest.raises(FtlabError,
                       match="config.optimizer: 'zo-lion' is not one of 'adamw', 'sgd', 'mezo', 'zo-momentum'"):
        build_optimizer(_cfg(tmp_path, "optimizer=zo-lion"), tiny_model)
    with pytest.raises(FtlabError, match="^unknown zeroth-order optimizer 'adamw'; choose one of mezo, "):
        build_zo_optimizer("adamw", tiny_model.parameters(), 1e-3, ZOSettings(), 0)
    for cls, kwargs in [(ZOMomentum, {"momentum": 1.0}), (ZOAdam, {"betas": (0.9,)}), (ZOAdam, {"betas": (0.9, 1.0)}),
                        (SparseMeZO, {"sparsity": 0.0}), (SparseMeZO, {"sparsity": 1.5})]:
        with pytest.raises(FtlabError):
            cls(tiny_model.parameters(), **kwargs)
