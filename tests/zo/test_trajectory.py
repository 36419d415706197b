import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.zo import MeZO, ZOStep
from ftlab.zo.trajectory import RECORD, TrajectoryLog, replay


def _log(tmp_path):
    log = TrajectoryLog(tmp_path)
    log.append(0, ZOStep([11], [0.5], 1e-3, 1.0))
    log.append(1, ZOStep([12, 13], [-0.25, 2.0], 1e-3, 1.0))
    log.append(2, ZOStep([14], [1.5], 5e-4, 1.0))
    return log


def test_records_are_16_bytes_and_read_back_grouped_by_step(tmp_path):
    log = _log(tmp_path)
    assert log.path.stat().st_size == 4 * RECORD.size == 64
    steps = list(log.steps())
    assert [s for s, _ in steps] == [0, 1, 2]
    assert steps[1][1].seeds == [12, 13] and steps[1][1].grads == [-0.25, 2.0]
    assert steps[2][1].lr == pytest.approx(5e-4, rel=1e-7)


def test_torn_tail_is_ignored_and_truncate_keeps_whole_steps(tmp_path):
    log = _log(tmp_path)
    with log.path.open("ab") as f:
        f.write(b"\x03\x00\x00")  # a record cut by a kill
    assert [s for s, _ in log.steps()] == [0, 1, 2]
    log.truncate(2)
    assert [s for s, _ in log.steps()] == [0, 1] and log.path.stat().st_size == 3 * RECORD.size


def test_replay_refuses_a_log_from_another_run(tmp_path):
    log = _log(tmp_path)
    opt = MeZO([torch.nn.Parameter(torch.zeros(3))], seed=0)
    with pytest.raises(FtlabError, match="belongs to another run"):
        replay(log, opt)
