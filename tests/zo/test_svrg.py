"""MeZO-SVRG (optimizer=mezo-svrg) on finite-sum quadratics ``f(x) = (1/N) sum_i 1/2 (x - a_i)^T H
(x - a_i)`` (central differences exact, gradients known; a minibatch's gradient H (x - mean a_I)
is noisy through the a_i's spread): the expected step, the variance near the anchor against
MeZO's, the loss reached for a budget of forwards against MeZO; a naive float64 reference; the
full-batch estimate's schedule (closure calls); bad settings, replay refused, state_dict round
trips, skipped steps; the full-batch objective train() gives it; data parallelism refused.

``python tests/zo/test_svrg.py`` prints the comparison with MeZO."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from reference import directions, f32
from torch import nn

from ftlab.errors import FtlabError
from ftlab.zo import MeZO
from ftlab.zo.svrg import WHOLE_SPLIT_LIMIT, MeZOSVRG

D, N, B = 16, 64, 4  # dimensions, examples, minibatch
EPS = 1e-3


class FiniteSum(nn.Module):
    """x, a Parameter, and N examples a_i: ``loss(idx)`` is the mean of 1/2 (x - a_i)^T H (x - a_i)
    over the examples ``idx``; its gradient is H (x - mean a_idx)."""

    def __init__(self, seed=0, spread=3.0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.h = torch.logspace(0, -1, D, dtype=torch.float64)
        self.a = torch.randn(N, D, generator=gen, dtype=torch.float64) * spread
        self.x = nn.Parameter(torch.zeros(D, dtype=dtype))

    def forward(self, idx=None):  # in exact mode the hooks perturb x inside forward only
        a = self.a if idx is None else self.a[idx]
        return 0.5 * (self.h * (self.x.double() - a) ** 2).sum(-1).mean()

    def loss(self, idx=None):
        return self(idx)

    def grad(self, idx=None):
        a = self.a if idx is None else self.a[idx]
        return self.h * (self.x.detach().double() - a.mean(0))

    def gap(self):
        """f(x) - min f."""
        return 0.5 * float((self.h * (self.x.detach().double() - self.a.mean(0)) ** 2).sum())


def svrg(model, **kwargs):
    """MeZO-SVRG over ``model.x`` with the whole set as its full batch."""
    opt = MeZOSVRG([model.x], **{"eps": EPS, "generator": "torch", **kwargs})
    opt.set_full_batch(lambda size: (model.loss, 1), N)
    return opt


def full_step_due(opt):
    return opt.anchor_age is None or opt.anchor_age >= opt.svrg_every


# -- what the steps estimate ---------------------------------------------------------------------------
def test_both_steps_are_unbiased_estimates_of_the_full_gradient():
    # n seeds a step average n estimates. The full-batch step moves by lr g~ ~ lr grad f(x~); the
    # SVRG step at x != x~ on ONE minibatch moves by lr (H (x - x~) + g~) ~ lr grad f(x): not along
    # that minibatch's own gradient (its noise cancels between x and x~).
    model = FiniteSum()
    opt = svrg(model, lr=1.0, n_perturbations=4000, seed=1)
    opt.param_groups[0]["lr"] = 1e-3
    x0, grad0 = model.x.detach().clone(), model.grad()
    opt.step(lambda: pytest.fail("a full-batch step runs no minibatch forward"))
    step = (x0 - model.x.detach()) / f32(1e-3)
    assert torch.nn.functional.cosine_similarity(step, grad0, dim=0) > 0.99
    assert torch.linalg.vector_norm(step - grad0) / torch.linalg.vector_norm(grad0) < 0.1
    with torch.no_grad():
        model.x.add_(torch.linspace(-1, 2, D, dtype=torch.float64))  # away from the anchor
    idx = [0, 1, 2, 3]
    opt.param_groups[0]["lr"] = 1.0
    x1, grad1, own = model.x.detach().clone(), model.grad(), model.grad(idx)
    opt.step(lambda: model.loss(idx))
    step = x1 - model.x.detach()
    cos = torch.nn.functional.cosine_similarity
    assert cos(step, grad1, dim=0) > 0.99
    assert torch.linalg.vector_norm(step - grad1) / torch.linalg.vector_norm(grad1) < 0.1
    assert cos(own, grad1, dim=0) < 0.9  # the minibatch's own gradient points elsewhere


def _estimate_error(make, trials=600, delta=0.02):
    """E ||step - grad f(x)||^2 of one lr-1 step at x = x~ + delta (a random minibatch each trial);
    ``make(model, seed)`` builds the optimizer and leaves it at its minibatch step."""
    model = FiniteSum()
    x_anchor = model.a.mean(0) + 0.3  # grad f small next to the minibatch gradients' spread
    rng, total = random.Random(0), 0.0
    for trial in range(trials):
        with torch.no_grad():
            model.x.copy_(x_anchor)
        opt = make(model, trial)
        with torch.no_grad():
            model.x.add_(delta)
        idx = rng.sample(range(N), B)
        x, grad = model.x.detach().clone(), model.grad()
        opt.param_groups[0]["lr"] = 1.0
        opt.step(lambda: model.loss(idx))  # noqa: B023 (called at once)
        total += float(((x - model.x.detach()) - grad).pow(2).sum())
    return total / trials


def test_near_the_anchor_the_estimate_varies_less_than_mezos():
    def make_svrg(model, seed):
        opt = svrg(model, lr=0.0, seed=seed)
        opt.step(lambda: pytest.fail("full-batch step"))  # lr 0: the anchor and g~ at x~, x unmoved
        assert not full_step_due(opt)
        return opt

    mezo = _estimate_error(lambda model, seed: MeZO([model.x], lr=0.0, eps=EPS, seed=seed, generator="torch"))
    ours = _estimate_error(make_svrg)
    assert ours < mezo / 4, (ours, mezo)


# -- against MeZO at equal forwards ---------------------------------------------------------------------
BUDGET = 24000  # example forwards: MeZO's step costs 2B, an SVRG step 4B, a full-batch step 2N
TARGETS = (1e-1, 1e-2)


def run(make, lr, budget=BUDGET, seed=0):
    """Steps until ``budget`` example forwards are spent; returns the final gap f - min f and,
    per target of TARGETS, the (steps, example forwards) at which the gap first fell below it."""
    model = FiniteSum()
    opt = make(model, lr, seed)
    rng, used, steps, reached = random.Random(seed), 0, 0, {}
    while used < budget:
        idx = rng.sample(range(N), B)
        used += 2 * N if isinstance(opt, MeZOSVRG) and full_step_due(opt) else opt.forwards_per_step * B
        opt.step(lambda: model.loss(idx))  # noqa: B023 (called at once)
        steps += 1
        gap = model.gap()
        if not math.isfinite(gap):
            return math.inf, reached
        reached.update({t: (steps, used) for t in TARGETS if gap < t and t not in reached})
    return model.gap(), reached


METHODS = {
    "mezo": (lambda model, lr, seed: MeZO([model.x], lr=lr, eps=EPS, seed=seed, generator="torch"),
             (5e-4, 1e-3, 2e-3, 5e-3)),
    "mezo-svrg q=5": (lambda model, lr, seed: svrg(model, lr=lr, seed=seed, svrg_every=5), (1e-2, 2e-2)),
}


def compare(seeds=(0, 1)):
    """Per method, at its best lr of its grid: the mean final gap over ``seeds``, the lr, and
    the first seed's (steps, example forwards) to each target."""
    out = {}
    for name, (make, lrs) in METHODS.items():
        results = {lr: [run(make, lr, seed=s) for s in seeds] for lr in lrs}
        lr = min(lrs, key=lambda lr: sum(gap for gap, _ in results[lr]))
        out[name] = (sum(gap for gap, _ in results[lr]) / len(seeds), lr, results[lr][0][1])
    return out


def test_reaches_a_lower_loss_than_mezo_for_the_same_forwards():
    # MeZO's minibatch noise leaves it at a floor its lr sets; SVRG's noise vanishes at the optimum.
    table = compare()
    mezo, ours = table["mezo"], table["mezo-svrg q=5"]
    start = FiniteSum().gap()
    assert mezo[0] > start / 100 and 1e-2 not in mezo[2]  # MeZO's best lr stalls above the 1e-2 target
    assert ours[0] < mezo[0] / 5, (ours, mezo)
    assert 1e-2 in ours[2] and ours[2][1e-1][1] < BUDGET / 2


# -- a naive float64 reference: z materialised, the anchor a copy ----------------------------------------
class TwoParams(nn.Module):
    """A quadratic in x plus a term coupling x and a matrix W (several chunks of z); the
    "full batch" is another function of the same parameters (so using the wrong one shows)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.x = nn.Parameter(torch.randn(16, generator=gen, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(6, 50, generator=gen, dtype=torch.float64) * 0.1)

    def forward(self, full=False):  # in exact mode the hooks perturb x and w inside forward only
        loss = 0.5 * ((self.x - 1) ** 2).sum() + (self.w ** 2).sum() + torch.cos(self.w.sum() * self.x[0])
        return loss + 0.3 * (self.x ** 2).sum() + torch.sin(self.w.mean()) if full else loss

    def full(self):
        return self(full=True)


def _differences(params, loss_fn, zs, eps, one_sided):
    """(L+ - L-) / (2 eps) per z (one-sided: (L+ - L0) / eps), unrounded, params restored."""
    out = []
    with torch.no_grad():
        base = float(loss_fn()) if one_sided else None
        for z in zs:
            for p, zi in zip(params, z):
                p.add_(eps * zi)
            plus = float(loss_fn())
            for p, zi in zip(params, z):
                p.sub_((1 if one_sided else 2) * eps * zi)
            out.append((plus - base) / eps if one_sided else (plus - float(loss_fn())) / (2 * eps))
            if not one_sided:
                for p, zi in zip(params, z):
                    p.add_(eps * zi)
    return out


def reference_step(model, state, seeds, lr, q, wd_of, chunk, generator, one_sided):
    """The module docstring's pseudocode, straightforwardly; ``state``: anchor, g~, age."""
    params, lr, n = [model.x, model.w], f32(lr), len(seeds)
    zs = directions(params, seeds, chunk, generator=generator)
    with torch.no_grad():
        if state.get("age") is None or state["age"] >= q:
            grads = [f32(g) for g in _differences(params, model.full, zs, EPS, one_sided)]
            state["anchor"] = [p.detach().clone() for p in params]
            state["g"] = [sum(g * z[i] for g, z in zip(grads, zs)) / n for i in range(len(params))]
            state["age"] = 1
        else:
            at_x = _differences(params, model, zs, EPS, one_sided)
            x = [p.detach().clone() for p in params]
            for p, a in zip(params, state["anchor"]):
                p.copy_(a)
            at_anchor = _differences(params, model, zs, EPS, one_sided)
            for p, v in zip(params, x):
                p.copy_(v)
            grads = [f32(g - a) for g, a in zip(at_x, at_anchor)]
            state["age"] += 1
        for i, p in enumerate(params):
            p.mul_(1 - lr * wd_of(i))
            if state["age"] > 1:
                p.sub_(lr * sum(g * z[i] for g, z in zip(grads, zs)) / n)
            p.sub_(lr * state["g"][i])
    return grads


@pytest.mark.parametrize("n,exact,generator,one_sided", [(1, False, "torch", False), (2, False, "table", False),
                                                         (3, False, "strided", False), (2, True, "strided", False),
                                                         (2, False, "torch", True), (1, True, "torch", True)])
def test_matches_a_naive_reference(n, exact, generator, one_sided):
    model = TwoParams()
    ref = copy.deepcopy(model)
    chunk, lr, wd, q = 40, 1e-2, 0.1, 3
    opt = MeZOSVRG([{"params": [model.x], "weight_decay": 0.0}, {"params": [model.w], "weight_decay": wd}], lr=lr,
                   eps=EPS, n_perturbations=n, one_sided=one_sided, generator=generator, seed=7, chunk_size=chunk,
                   exact=exact, svrg_every=q)
    opt.attach(model)
    opt.set_full_batch(lambda size: (model.full, 1), 10)
    state = {}
    for _ in range(7):  # full-batch steps 0, 3 and 6
        opt.step(model)
        record = opt.history[-1]
        want = reference_step(ref, state, record.seeds, lr, q, lambda i: wd if i == 1 else 0.0, chunk, generator,
                              one_sided)
        assert record.grads == pytest.approx(want, rel=1e-6, abs=1e-8)
    for p, r, anchor, g in zip([model.x, model.w], [ref.x, ref.w], state["anchor"], state["g"]):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)
        torch.testing.assert_close(opt.state[p]["anchor"], anchor, rtol=0, atol=1e-10)
        torch.testing.assert_close(opt.state[p]["full_grad"], g, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


# -- the schedule of full-batch estimates, forwards, settings --------------------------------------------
@pytest.mark.parametrize("q,n,one_sided", [(1, 1, False), (3, 1, False), (4, 2, False), (3, 2, True)])
def test_the_full_batch_estimate_is_recomputed_exactly_every_q_steps(q, n, one_sided):
    model = FiniteSum()
    full_calls, mini_calls = [], []
    opt = MeZOSVRG([model.x], lr=1e-3, eps=EPS, svrg_every=q, n_perturbations=n, one_sided=one_sided)
    opt.set_full_batch(lambda size: (lambda: full_calls.append(1) or model.loss(), 1), N)
    per_full = n + 1 if one_sided else 2 * n
    assert opt.forwards_per_step == 2 * per_full
    for step in range(12):
        before = (len(full_calls), len(mini_calls))
        opt.step(lambda: mini_calls.append(1) or model.loss([0, 1]))
        done = (len(full_calls) - before[0], len(mini_calls) - before[1])
        assert done == ((per_full, 0) if step % q == 0 else (0, opt.forwards_per_step)), step
    assert opt.anchor_age == 12 - q * (11 // q)  # steps since the last full-batch step


@pytest.mark.parametrize("n", [1, 3])
def test_one_all_reduce_of_the_loss_differences_a_step(n):
    # Data parallel MeZO averages a step's differences in one all-reduce (opt._mean); so does this
    # optimizer: n + 1 floats on a full-batch step, 2n + 1 (x's, the anchor's, L+) on an SVRG step.
    model = FiniteSum()
    opt = svrg(model, lr=1e-2, n_perturbations=n, svrg_every=2)
    means = []
    opt._mean = lambda values: means.append(list(values)) or values
    for _ in range(2):
        opt.step(lambda: model.loss([0, 1]))
    assert [len(m) for m in means] == [n + 1, 2 * n + 1]
    record = opt.history[-1]
    assert record.loss == means[1][-1]
    assert record.grads[0] == f32((means[1][0] - means[1][n]) / (2 * EPS))


def test_bad_settings_are_refused_in_one_line():
    p = nn.Parameter(torch.zeros(4))
    for kwargs in [{"svrg_every": 0}, {"svrg_batch": 0}, {"svrg_every": -2}, {"full_lr_scale": 0.0}]:
        with pytest.raises(FtlabError, match="MeZO-SVRG needs svrg_every >= 1, svrg_batch >= 1") as info:
            MeZOSVRG([p], **kwargs)
        assert "\n" not in str(info.value)
    for kwargs, available, match in [({}, WHOLE_SPLIT_LIMIT + 1, "without a full-batch size .* set zo.svrg_batch"),
                                     ({"svrg_batch": 33}, 32, "zo.svrg_batch=33 exceeds the training split")]:
        with pytest.raises(FtlabError, match=match) as info:
            MeZOSVRG([p], **kwargs).set_full_batch(lambda size: pytest.fail("not built"), available)
        assert "\n" not in str(info.value)
    asked = []
    MeZOSVRG([p]).set_full_batch(lambda size: asked.append(size) or (lambda: p.sum(), 1), WHOLE_SPLIT_LIMIT)
    MeZOSVRG([p], svrg_batch=8).set_full_batch(lambda size: asked.append(size) or (lambda: p.sum(), 1), 32)
    assert asked == [WHOLE_SPLIT_LIMIT, 8]
    with pytest.raises(FtlabError, match="needs a full-batch objective: call set_full_batch") as info:
        MeZOSVRG([p]).step(lambda: p.sum())
    assert "\n" not in str(info.value)


def test_replay_is_refused_in_one_line_and_the_cost_is_stated():
    model = FiniteSum()
    opt = svrg(model, lr=1e-2, svrg_every=4, svrg_batch=N)
    opt.step(model.loss)
    assert opt.replayable is False and opt.needs_full_batch and opt.extra_bytes_per_entry == 8
    assert opt.buffers == ("anchor", "full_grad")
    with pytest.raises(FtlabError, match="^MeZO-SVRG steps cannot be replayed") as info:
        opt.replay(opt.history[-1])
    assert "\n" not in str(info.value)
    assert opt.cost() == ("MeZOSVRG: 4 forwards a step (half at the anchor), and every 4 steps instead 2 forwards of "
                          "the full batch (64 examples, 1 batch forward each), 8 extra bytes per trainable entry")


def _same_state(a, b):
    assert a.anchor_age == b.anchor_age
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        for name in ("anchor", "full_grad"):
            assert torch.equal(a.state[p][name], b.state[q][name]), name


@pytest.mark.parametrize("exact,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_state_dict_round_trip_continues_identically(exact, dtype):
    # Saved in the middle of an epoch (anchor 2 steps old): the anchor, g~ and its age come back.
    def build(seed):
        model = FiniteSum(dtype=dtype)
        opt = svrg(model, lr=1e-2, eps=5e-2, n_perturbations=2, exact=exact, svrg_every=3, seed=seed)
        opt.attach(model)
        return model, opt

    model, opt = build(3)
    start = model.x.detach().clone()
    for _ in range(5):
        opt.step(lambda: model.loss([0, 1]))
    assert opt.anchor_age == 2 and opt.state[model.x]["anchor"].dtype == torch.float32
    assert not torch.equal(model.x.detach(), start)
    saved, saved_x = copy.deepcopy(opt.state_dict()), model.x.detach().clone()
    for _ in range(4):
        opt.step(lambda: model.loss([0, 1]))
    fresh_model, fresh = build(999)  # the seed generator comes from the state
    with torch.no_grad():
        fresh_model.x.copy_(saved_x)
    fresh.load_state_dict(saved)
    assert fresh.state[fresh_model.x]["anchor"].dtype == torch.float32
    for _ in range(4):
        fresh.step(lambda: fresh_model.loss([0, 1]))
    assert torch.equal(fresh_model.x, model.x)
    _same_state(fresh, opt)
    assert [r.seeds for r in fresh.history] == [r.seeds for r in opt.history[5:]]


@pytest.mark.parametrize("exact", [False, True])
def test_a_skipped_step_leaves_weights_anchor_and_estimate_alone(exact):
    model = FiniteSum(dtype=torch.float32)
    opt = MeZOSVRG([model.x], lr=1e-2, eps=1e-2, svrg_every=3, exact=exact)
    opt.attach(model)
    full = {"bad": True}
    opt.set_full_batch(lambda size: (lambda: torch.tensor(math.nan) if full["bad"] else model.loss(), 1), N)
    x = model.x.detach().clone()
    assert math.isnan(float(opt.step(model.loss)))  # a non-finite full-batch estimate: no anchor yet
    torch.testing.assert_close(model.x.detach(), x, rtol=0, atol=0 if exact else 1e-6)
    assert opt.anchor_age is None and opt.history[-1].lr == 0.0
    full["bad"] = False
    opt.step(model.loss)  # tried again
    assert opt.anchor_age == 1
    x, anchor = model.x.detach().clone(), opt.state[model.x]["anchor"].clone()
    g = opt.state[model.x]["full_grad"].clone()
    calls = iter([1.0, float("nan"), 2.0, 1.0])  # L+ (not finite), L- at x; L+, L- at the anchor
    assert math.isnan(float(opt.step(lambda: torch.tensor(next(calls)))))
    torch.testing.assert_close(model.x.detach(), x, rtol=0, atol=0 if exact else 1e-6)
    assert torch.equal(opt.state[model.x]["anchor"], anchor) and torch.equal(opt.state[model.x]["full_grad"], g)
    assert opt.history[-1].lr == 0.0 and opt.history[-1].grads == [0.0]


def test_bf16_exact_mode_converges_with_float32_state():
    model = FiniteSum(dtype=torch.bfloat16)
    opt = svrg(model, lr=2e-2, eps=5e-2)
    assert opt.exact
    opt.attach(model)
    start, rng = model.gap(), random.Random(0)
    for _ in range(300):
        idx = rng.sample(range(N), B)
        opt.step(lambda: model.loss(idx))  # noqa: B023 (called at once)
    assert model.gap() < start / 10
    assert {opt.state[model.x][k].dtype for k in opt.buffers} == {torch.float32}
    assert model.x.dtype == torch.bfloat16


# -- in ftlab train: the full-batch objective, data parallelism ---------------------------------------------
def test_train_gives_a_fixed_micro_batched_full_batch_objective(tmp_path, tiny_model, tiny_tokenizer):
    from test_train import _cfg, _data

    from ftlab.evaluate import model_device
    from ftlab.objectives import Encoder, objective_fn
    from ftlab.parallel import Single
    from ftlab.train import _give_full_batch, build_trainer

    cfg = _cfg(tmp_path, "optimizer=mezo-svrg", "zo.svrg_batch=10", "batch_size=6", "grad_accum=2")
    data = _data()
    parallel = Single(cfg)
    module, optimizer, _ = build_trainer(cfg, tiny_model, parallel)
    parallel.setup(module, optimizer)
    encoder = Encoder(tiny_tokenizer, data.spec, max_length=cfg.data.max_length)
    made = []
    optimizer.set_full_batch = lambda make, available: made.append((make, available))
    _give_full_batch(cfg, parallel, optimizer, tiny_tokenizer, encoder, data.splits.train)
    (make, available), = made
    assert available == len(data.splits.train) == 32
    with torch.no_grad():
        closure, batches = make(10)
        values = [float(closure()), float(closure()), float(make(10)[0]())]  # a resumed run makes it again
        whole, whole_batches = make(32)
        each = [float(objective_fn("loss", module, tiny_tokenizer, encoder, [ex], model_device(module))())
                for ex in data.splits.train]
    assert batches == 4 and whole_batches == 11  # micro-batches of batch_size / grad_accum = 3 examples
    assert values[0] == values[1] == values[2]  # the same examples every time
    assert min(each) < values[0] < max(each)
    # the whole split: the mean over its 32 examples (10 micro-batches of 3 and one of 2, weighted)
    assert float(whole()) == pytest.approx(sum(each) / 32, rel=1e-5)


def test_data_parallelism_is_refused_in_one_line(tmp_path, tiny_model):
    from test_train import _cfg

    from ftlab.parallel import ZODataParallel
    from ftlab.train import build_trainer

    cfg = _cfg(tmp_path, "optimizer=mezo-svrg")
    module, optimizer, _ = build_trainer(cfg, tiny_model)
    with pytest.raises(FtlabError, match="mezo-svrg is not implemented under data parallelism") as info:
        ZODataParallel(cfg, rank=0, world=2).setup(module, optimizer)
    assert "\n" not in str(info.value)


if __name__ == "__main__":
    start = FiniteSum().gap()
    print(f"finite-sum quadratic: d={D}, N={N}, minibatch {B}; start gap {start:.4g}; {BUDGET} example forwards "
          f"(MeZO step 2B, SVRG step 4B, full-batch step 2N); best lr of each grid, mean of 2 seeds")
    for name, (gap, lr, reached) in compare().items():
        to = "  ".join(f"gap<{t:g}: " + (f"step {reached[t][0]} ({reached[t][1]} fwd)" if t in reached else "never")
                       for t in TARGETS)
        print(f"  {name:14s} final gap {gap:9.3g}  (lr {lr:g})  {to}")
