import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.tint.reference import Approximations, approximate_step, approximation_costs, exact_step, whole_context_mask

LR = 0.05


def _close(a, b, tol):
    return all(float((a[i][k] - b[i][k]).abs().max()) <= tol * float(b[i][k].abs().max() + 1e-30)
               for i in range(len(a)) for k in a[i])


@pytest.mark.parametrize("k", [1, 3])
def test_no_approximation_equals_autograd(tiny_inner, sequence, k):
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    ours = approximate_step(tiny_inner, ids, n_train, mask, k, LR, Approximations.none())
    auto = exact_step(tiny_inner, ids, n_train, mask, k, LR)
    assert _close(ours.grads, auto.grads, 1e-10)
    torch.testing.assert_close(ours.test_logits, auto.test_logits, rtol=1e-10, atol=1e-12)
    assert ours.grads[0]["q"].abs().max() > 0  # the full backward reaches the queries


def test_stop_gradient_equals_autograd_with_detached_scores(tiny_inner, sequence):
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    ours = approximate_step(tiny_inner, ids, n_train, mask, 2, LR, Approximations(True, None, False))
    auto = exact_step(tiny_inner, ids, n_train, mask, 2, LR, stop_attention_grad=True)
    assert _close(ours.grads, auto.grads, 1e-10)
    assert float(ours.grads[0]["q"].abs().max()) == 0.0 and float(ours.grads[0]["k"].abs().max()) == 0.0
    exact = exact_step(tiny_inner, ids, n_train, mask, 2, LR)
    assert not _close(ours.grads, exact.grads, 1e-3)  # the approximation changes something


def test_sum_over_tokens_scales_the_gradient(tiny_inner, sequence):
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    summed = approximate_step(tiny_inner, ids, n_train, mask, 1, LR, Approximations(False, None, True))
    auto = exact_step(tiny_inner, ids, n_train, mask, 1, LR, sum_over_tokens=True)
    assert summed.n_loss_tokens == n_train - 1
    assert _close(summed.grads, auto.grads, 1e-10)


def test_finite_differences_converge_first_order(tiny_inner, sequence):
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    exact = approximate_step(tiny_inner, ids, n_train, mask, 3, LR, Approximations(True, None, True))
    errors = []
    for n in (1.0, 10.0, 100.0, 1000.0):
        fd = approximate_step(tiny_inner, ids, n_train, mask, 3, LR, Approximations(True, n, True))
        flat = lambda s: torch.cat([g[k].reshape(-1) for g in s.grads for k in g])  # noqa: E731
        errors.append(float((flat(fd) - flat(exact)).norm() / flat(exact).norm()))
    assert errors[0] > 1e-4  # N = 1 is visibly off on these weights
    for coarse, fine in zip(errors, errors[1:]):
        assert 5 < coarse / fine < 20  # error ~ 1/N


def test_label_word_mask_and_bad_splits(tiny_inner, sequence):
    ids, n_train = sequence
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[[4, 9]] = True
    step = approximate_step(tiny_inner, ids, n_train, mask, 1, LR)
    assert step.n_loss_tokens == 2 and step.test_logits.shape == (len(ids) - n_train, 61)
    with pytest.raises(FtlabError, match="no training part"):
        approximate_step(tiny_inner, ids, 0, torch.zeros_like(mask), 1, LR)
    with pytest.raises(FtlabError, match="no loss tokens"):
        approximate_step(tiny_inner, ids, n_train, torch.zeros_like(mask), 1, LR)
    bad = mask.clone()
    bad[n_train] = True
    with pytest.raises(FtlabError, match="outside the training part"):
        approximate_step(tiny_inner, ids, n_train, bad, 1, LR)
    with pytest.raises(FtlabError, match="k=4"):
        approximate_step(tiny_inner, ids, n_train, mask, 4, LR)


def test_step_lowers_training_loss(tiny_inner, sequence):
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    step = exact_step(tiny_inner, ids, n_train, mask, 3, 0.5)
    again = exact_step(type(tiny_inner)(**{**tiny_inner.__dict__, "layers": tiny_inner.layers[:0] + step.layers}),
                       ids, n_train, mask, 3, 0.0)
    assert again.train_loss < step.train_loss


def test_costs_of_each_approximation(tiny_inner, sequence):
    ids, n_train = sequence
    costs = approximation_costs(tiny_inner, ids, n_train, whole_context_mask(ids, n_train), 2, LR, 100.0)
    assert set(costs) == {"base", "exact", "stop_attention_grad", "finite_diff", "sum_over_tokens", "all (TinT)"}
    assert costs["finite_diff"]["update_rel_error"] < 0.05
    assert 0 < costs["stop_attention_grad"]["update_rel_error"] < 1
    assert costs["sum_over_tokens"]["update_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert costs["sum_over_tokens"]["update_rel_error"] == pytest.approx(n_train - 2, rel=1e-9)
