"""Batch-size scaling rules against their formulas, against each other, and on bad input."""

import math

import pytest

from ftlab.config import TrainConfig
from ftlab.errors import FtlabError
from ftlab.scaling import OPTIMIZERS, OptimizerHParams, from_train_config, scale, to_train_config


def _h(optimizer, **kw):
    base = dict(lr=2e-4, batch_size=8, momentum=0.5, betas=[0.9, 0.99], eps=1e-6, weight_decay=0.01,
                n_perturbations=2)
    return OptimizerHParams(optimizer=optimizer, **{**base, **kw})


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_square_root_rule_for_adam(optimizer):
    out = scale(_h(optimizer), 4).hparams
    assert out.batch_size == 32
    assert out.lr == pytest.approx(2e-4 * 2)
    assert out.betas == pytest.approx([1 - 4 * 0.1, 1 - 4 * 0.01])
    assert out.eps == pytest.approx(1e-6 / 2)
    assert out.weight_decay == pytest.approx(0.01 * 2)


def test_rmsprop_scales_only_its_smoothing_constant():
    out = scale(_h("rmsprop", betas=[0.0, 0.99]), 9).hparams
    assert out.lr == pytest.approx(2e-4 * 3) and out.eps == pytest.approx(1e-6 / 3)
    assert out.betas == pytest.approx([0.0, 1 - 9 * 0.01])  # beta1 unused: left as given, not checked


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_linear_rule_for_sgd_keeps_momentum(momentum):
    before = _h("sgd", momentum=momentum)
    out = scale(before, 3).hparams
    assert out.lr == pytest.approx(6e-4) and out.batch_size == 24
    assert out.momentum == momentum and out.weight_decay == before.weight_decay
    # Wang et al.: the effective lr lr / (1 - momentum) follows the linear rule.
    assert out.lr / (1 - out.momentum) == pytest.approx(3 * before.lr / (1 - momentum))


def test_mezo_rule_scales_lr_and_perturbations_linearly():
    out = scale(_h("mezo"), 2).hparams
    assert (out.lr, out.batch_size, out.n_perturbations) == (pytest.approx(4e-4), 16, 4)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kappa", [0.5, 2.0, 4.0])
def test_kappa_then_inverse_is_the_identity(optimizer, kappa):
    before = _h(optimizer)
    after = scale(scale(before, kappa).hparams, 1 / kappa).hparams
    for key in ("lr", "eps", "weight_decay", "momentum"):
        assert getattr(after, key) == pytest.approx(getattr(before, key), rel=1e-12), key
    assert after.betas == pytest.approx(before.betas, rel=1e-12)
    assert (after.batch_size, after.n_perturbations) == (before.batch_size, before.n_perturbations)


def test_composition_equals_one_step():
    h = _h("adam")
    twice = scale(scale(h, 2).hparams, 3).hparams
    once = scale(h, 6).hparams
    assert twice.lr == pytest.approx(once.lr) and twice.betas == pytest.approx(once.betas)
    assert twice.eps == pytest.approx(once.eps)


def test_every_rule_explains_itself_in_one_line():
    for optimizer in OPTIMIZERS:
        text = scale(_h(optimizer), 2).explanation
        assert text and "\n" not in text


@pytest.mark.parametrize("kappa", [0, -2, math.nan, math.inf])
def test_bad_kappa(kappa):
    with pytest.raises(FtlabError, match="kappa must be a positive number"):
        scale(_h("adam"), kappa)


def test_beta_pushed_out_of_range_says_why():
    # 1 - beta1 = 0.1, x 16 = 1.6 > 1: beta1 would be -0.6.
    with pytest.raises(FtlabError, match=r"beta1 = -0.6 after scaling.*kappa < 10"):
        scale(_h("adam"), 16)


@pytest.mark.parametrize("kw,match", [(dict(betas=[1.0, 0.999]), r"beta1 = 1 \(given\)"),
                                      (dict(betas=[0.9, -0.1]), "beta2"),
                                      (dict(optimizer="sgd", momentum=1.0), "momentum")])
def test_beta_out_of_range_before_scaling(kw, match):
    with pytest.raises(FtlabError, match=match):
        scale(_h(**{"optimizer": "adam", **kw}), 2)


def test_batch_that_is_not_whole_and_unknown_optimizer():
    with pytest.raises(FtlabError, match="not a whole number"):
        scale(_h("adam", batch_size=3), 0.5)
    with pytest.raises(FtlabError, match="no scaling rule for optimizer 'lamb'"):
        scale(_h("lamb"), 2)


def test_round_trip_through_a_training_config():
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, batch_size=4, adam_betas=[0.9, 0.999], adam_eps=1e-8,
                      weight_decay=0.1)
    new = to_train_config(cfg, scale(from_train_config(cfg), 4).hparams)
    assert (new.batch_size, new.lr, new.weight_decay) == (16, pytest.approx(2e-3), pytest.approx(0.2))
    assert new.adam_betas == pytest.approx([0.6, 0.996]) and new.adam_eps == pytest.approx(5e-9)
    assert new.steps == cfg.steps and new.optimizer == "adamw"
    mezo_cfg = TrainConfig(optimizer="mezo", batch_size=8)
    mezo = to_train_config(mezo_cfg, scale(from_train_config(mezo_cfg), 2).hparams)
    assert mezo.zo.n_perturbations == 2
