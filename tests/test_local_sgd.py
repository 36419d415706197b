"""Local SGD's schedule (ftlab.local_sgd): the quadratic synchronization rule against the
paper's formula, round boundaries and communication rounds, and the bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from ftlab.config import LocalSGDSettings, TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.local_sgd import LocalSGDAverager, period_for, quadratic_period
from ftlab.optim import lr_factor


def test_quadratic_rule_is_the_papers_formula():
    # H = max(H_base, floor((alpha / lr)^2)) (Gu et al. 2024, eq. for QSR)
    assert quadratic_period(0.1, 0.2, 2) == 4
    assert quadratic_period(0.1, 0.05, 2) == 2  # (0.5)^2 = 0.25 -> H_base
    assert quadratic_period(0.03, 0.1, 1) == math.floor((0.1 / 0.03) ** 2) == 11
    assert quadratic_period(0.0, 0.1, 1) > 10 ** 15  # lr 0: no more averages before the end
    assert period_for(LocalSGDSettings(period=3), 0.5) == 3


def _run(settings: LocalSGDSettings, lrs: list[float]) -> tuple[list[int], list[int], LocalSGDAverager]:
    """Averaging steps and the H of each round, over len(lrs) steps (lr of step t = lrs[t])."""
    averager = LocalSGDAverager(settings, total_steps=len(lrs), world=1)
    averager.start(lrs[0])
    averaged, periods = [], [averager.period]
    for t in range(len(lrs)):
        if averager.after_step([], lrs[t + 1] if t + 1 < len(lrs) else 0.0):
            averaged.append(t + 1)
            periods.append(averager.period)
    return averaged, periods, averager


def test_constant_h_and_the_last_round_cut_at_the_end():
    averaged, _, averager = _run(LocalSGDSettings(period=3), [0.1] * 10)
    assert averaged == [3, 6, 9, 10] and averager.rounds == 4 and averager.synced


def test_post_local_switch_step():
    averaged, _, averager = _run(LocalSGDSettings(period=2, switch_step=3), [0.1] * 8)
    assert averaged == [5, 7, 8] and averager.sync_steps == 3 and averager.rounds == 6


def test_quadratic_rule_grows_rounds_as_a_cosine_lr_decays():
    base, steps, alpha = 0.1, 40, 0.15
    lrs = [base * lr_factor("cosine", t, steps) for t in range(steps)]
    averaged, periods, _ = _run(LocalSGDSettings(period=2, rule="quadratic", alpha=alpha), lrs)
    starts = [0] + averaged[:-1]
    for start, h in zip(starts, periods):  # H of each round from the lr at its first step
        assert h == max(2, math.floor((alpha / lrs[start]) ** 2))
    assert periods[0] == 2 and max(periods[:-1]) > 2  # grows as the lr falls
    assert averaged[-1] == steps


def test_counters_survive_a_resume():
    settings = LocalSGDSettings(period=3)
    a = LocalSGDAverager(settings, total_steps=10, world=1)
    a.start(0.1)
    for _ in range(4):
        a.after_step([], 0.1)
    b = LocalSGDAverager(settings, total_steps=10, world=1)
    b.load_state_dict(a.state_dict())
    assert [b.after_step([], 0.1) for _ in range(6)] == [False, True, False, False, True, True]


def test_averaging_in_one_process_leaves_the_weights_alone():
    p = torch.nn.Parameter(torch.arange(3.0))
    LocalSGDAverager(LocalSGDSettings(period=1), 1, world=1).average_parameters([p])
    assert torch.equal(p.detach(), torch.arange(3.0))


@pytest.mark.parametrize("overrides, message", [
    (["local_sgd.period=0"], r"config.local_sgd.period: must be >= 1 \(H, the local steps between averages"),
    (["optimizer=mezo", "local_sgd.period=4"], "Local SGD averages first-order models; mezo is zeroth order .* "
                                               "set local_sgd.period=null, or use optimizer=sgd or adamw"),
    (["local_sgd.period=2", "local_sgd.rule=quadratic"], "local_sgd.alpha: must be set"),
    (["local_sgd.period=2", "local_sgd.switch_step=-1"], "switch_step: must be >= 0"),
])
def test_bad_local_sgd_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(FtlabError, match=message):
        load_config(TrainConfig, None, overrides)
