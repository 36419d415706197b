"""MeZO against a straightforward reference (z materialised, drawn 4 times a step, restore then
update; see reference.py), in float64 so only the fused arithmetic's rounding separates them."""

import copy

import pytest
import torch
from reference import reference_step

from ftlab.errors import FtlabError
from ftlab.zo import MeZO


def _setup(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama").double()
    ids = torch.tensor([tiny_tokenizer("the movie was great and the story was good")["input_ids"]])

    def loss_fn():
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)
    return model, loss_fn


@pytest.mark.parametrize("generator", ["strided", "table", "torch"])
@pytest.mark.parametrize("n,one_sided,distribution,wd", [
    (1, False, "gaussian", 0.0), (1, False, "rademacher", 0.1), (3, False, "gaussian", 0.1),
    (2, True, "gaussian", 0.0)])
def test_matches_the_straightforward_design(tiny_model_factory, tiny_tokenizer, n, one_sided, distribution, wd,
                                            generator):
    model, loss_fn = _setup(tiny_model_factory, tiny_tokenizer)
    ref_model = copy.deepcopy(model)
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    groups = [{"params": decay, "weight_decay": wd},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    chunk = 1000  # several chunks per matrix
    opt = MeZO(groups, lr=1e-2, eps=1e-3, n_perturbations=n, one_sided=one_sided,
               distribution=distribution, generator=generator, seed=7, chunk_size=chunk)

    ref_params = [q for q in ref_model.parameters() if q.ndim >= 2] + \
                 [q for q in ref_model.parameters() if q.ndim < 2]
    ref_decay = {id(q) for q in ref_params if q.ndim >= 2}

    def ref_loss():
        with torch.no_grad():
            return float(ref_model(input_ids=ids, labels=ids).loss)
    ids = torch.tensor([tiny_tokenizer("the movie was great and the story was good")["input_ids"]])

    for _ in range(3):
        opt.step(loss_fn)
        record = opt.history[-1]
        want_grads = reference_step(ref_params, ref_loss, record.seeds, 1e-2, 1e-3,
                                    lambda p: wd if id(p) in ref_decay else 0.0, chunk, one_sided, distribution,
                                    generator)
        assert record.grads == pytest.approx(want_grads, rel=1e-6, abs=1e-9)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    assert all(p.grad is None for p in model.parameters())  # no gradients, no optimizer state
    assert not opt.state


def test_replay_from_the_log_is_bitwise(tiny_model_factory):
    model = tiny_model_factory("llama")  # float32: in-place moves round, replay must round alike
    base = copy.deepcopy(model)
    ids = torch.arange(2, 30)[None]
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3, n_perturbations=2)
    for _ in range(4):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    replayer = MeZO(base.parameters(), lr=1e-3, eps=1e-3, weight_decay=0.01, seed=999, n_perturbations=2)
    for record in opt.history:
        replayer.replay(record)
    for p, q in zip(model.parameters(), base.parameters()):
        assert torch.equal(p, q)


def test_state_dict_resumes_the_seed_stream(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 20)[None]
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=1)
    opt.step(closure)
    saved = opt.state_dict()
    opt.step(closure)
    fresh = MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=12345)
    fresh.load_state_dict(saved)
    fresh.step(closure)
    assert fresh.history[-1].seeds == opt.history[-1].seeds


def test_mezo_lowers_a_loss(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.arange(2, 40)[None]
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    start = float(closure().detach())
    opt = MeZO(model.parameters(), lr=2e-3, eps=1e-3, seed=0)
    for _ in range(150):
        opt.step(closure)
    assert float(closure().detach()) < start - 0.05


def _flat_z(opt, seed, p):
    return torch.cat([(z * s).reshape(-1) for _, z, s in opt._z_chunks(seed, 0, p)])


@pytest.mark.parametrize("generator", ["strided", "table"])
def test_table_directions_are_isotropic(generator):
    """E[z z^T] = I for table-made z: unit second moment, no correlation between entries."""
    opt = MeZO([torch.nn.Parameter(torch.zeros(4, 300))], chunk_size=256, generator=generator)
    p = opt.param_groups[0]["params"][0]
    zs = torch.stack([_flat_z(opt, seed, p) for seed in range(2000)]).double()
    second = zs.T @ zs / len(zs)
    assert (second.diagonal() - 1).abs().mean() < 0.05
    off = second - torch.diag(second.diagonal())
    assert off.abs().max() < 0.15 and off.abs().mean() < 0.03  # ~N(0, 1/sqrt(2000)) noise


def test_strided_rows_that_share_table_entries_are_uncorrelated():
    """A tensor too large for disjoint rows (64 rows of 65536 > the 2^20 table) reads
    overlapping table entries in different rows: z[r, c] and z[r+1, c-s] are the same draw,
    but their random row signs make the product average to zero over steps."""
    from ftlab.zo.directions import strides

    p = torch.nn.Parameter(torch.zeros(64, 1 << 16))
    opt = MeZO([p], chunk_size=1 << 16)
    shared, square = [], []
    for seed in range(400):
        st = strides(seed, 0, p.numel(), 1 << 16)
        assert st.stride < 1 << 16  # the rows overlap in the table
        z = _flat_z(opt, seed, p).view(64, -1)
        r, c = seed % 63, (1 << 16) - 1
        assert z[r, c].abs() == z[r + 1, c - st.stride].abs()  # the same table entry
        shared.append(float(z[r, c] * z[r + 1, c - st.stride]))
        square.append(float(z[r, c] ** 2))
    assert abs(sum(shared) / len(shared)) < 4 * (sum(s * s for s in shared) / len(shared)) ** 0.5 / 20
    assert sum(square) / len(square) == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"n_perturbations": 0}, {"distribution": "uniform"},
                                    {"generator": "philox"}])
def test_bad_settings(tiny_model, kwargs):
    with pytest.raises(FtlabError):
        MeZO(tiny_model.parameters(), **kwargs)


def test_the_functional_core_evaluates_in_order_and_skips_non_finite_steps():
    """mezo() alone, on plain Python operations: the loss calls in the documented order, the
    projected gradients rounded to float32, and a non-finite loss logged as a skipped step."""
    from ftlab.zo.mezo import f32, mezo

    calls, updates = [], []

    def loss(seed, coef):
        calls.append((seed, coef))
        return 1.0 + (seed or 0) * coef

    record = mezo([2, 3], loss, lambda *a: updates.append(a), lr=0.1, eps=0.5)
    assert calls == [(2, 0.5), (2, -0.5), (3, 0.5), (3, -0.5)]
    assert record.grads == [2.0, 3.0] and record.loss == 2.0 and record.lr == 0.1
    assert updates == [([2, 3], [2.0, 3.0], 0.1)]

    calls.clear()
    record = mezo([3], loss, lambda *a: None, lr=0.1, eps=0.1, one_sided=True, mean=lambda v: [x / 2 for x in v])
    assert calls == [(None, 0.0), (3, 0.1)]
    assert record.grads == [f32((1.0 + 3 * 0.1 - 1.0) / 2 / 0.1)] and record.loss == (1.0 + 3 * 0.1) / 2

    record = mezo([4], lambda seed, coef: float("nan"), lambda *a: updates.append(a), lr=0.1, eps=0.5)
    assert record.grads == [0.0] and record.lr == 0.0 and record.loss != record.loss
    assert updates[-1] == ([4], [0.0], 0.0)  # the update still runs: it restores theta
