"""The trajectory log: round trips, replay, and fault injection -- every flipped bit, every cut,
concurrent writers, foreign z settings and old formats are refused with a line that says where."""

import os
import struct
import zlib

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.zo import MeZO, ZOStep
from ftlab.zo.trajectory import MAGIC, PAYLOAD, PREFIX, RECORD, TrajectoryLog, pack_record, replay

Z = {"optimizer": "MeZO", "generator": "table", "distribution": "gaussian", "chunk_size": 1000}
STEPS = [ZOStep([11], [0.5], 1e-3, 1.0), ZOStep([12], [-0.25], 1e-3, 1.0), ZOStep([14], [1.5], 5e-4, 1.0)]


def _log(tmp_path, steps=STEPS, **kw):
    log = TrajectoryLog(tmp_path, **{"z": Z, **kw})
    for step, record in enumerate(steps):
        log.append(step, record)
    return log


def _header_size(log):
    return TrajectoryLog(log.path.parent).header_size


def _raw_log(tmp_path, records, n=1, z=Z):
    """A log written byte by byte (what faulty writers leave), records (step, seed, g, lr)."""
    log = TrajectoryLog(tmp_path, z=z)
    log.append(0, ZOStep([0] * n, [0.0] * n, 0.0, 0.0))
    head = log.path.read_bytes()[:_header_size(log)]
    log.path.write_bytes(head + b"".join(pack_record(*r) for r in records))
    return log


# -- format and round trips -------------------------------------------------------------------------
def test_header_and_20_byte_records_read_back_grouped_by_step(tmp_path):
    two = [ZOStep([11, 10], [0.5, 0.1], 1e-3, 1.0), ZOStep([12, 13], [-0.25, 2.0], 1e-3, 1.0),
           ZOStep([14, 15], [1.5, 0.0], 5e-4, 1.0)]
    log = _log(tmp_path, two, run_id="run-7")
    raw = log.path.read_bytes()
    head = _header_size(log)
    assert raw.startswith(MAGIC) and PREFIX.unpack_from(raw)[1] == 2
    assert log.header == {"run_id": "run-7", "z": Z, "perturbations": 2}
    assert len(raw) == head + 6 * RECORD.size and RECORD.size == 20
    assert raw[-RECORD.size:] == pack_record(2, 15, 0.0, 5e-4)
    steps = list(log.steps())
    assert [s for s, _ in steps] == [0, 1, 2]
    assert steps[1][1].seeds == [12, 13] and steps[1][1].grads == [-0.25, 2.0]
    assert steps[2][1].lr == pytest.approx(5e-4, rel=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.bin"]  # the header's temp is gone


def test_identical_runs_write_identical_logs(tmp_path):
    assert _log(tmp_path / "a").path.read_bytes() == _log(tmp_path / "b").path.read_bytes()


def test_replay_rebuilds_the_weights_bitwise(tmp_path):
    def model():
        return [torch.nn.Parameter(torch.linspace(-1, 1, 50))]

    params = model()
    opt = MeZO(params, lr=1e-2, eps=1e-3, seed=3, generator="table", chunk_size=16)
    log = TrajectoryLog(tmp_path)
    assert replay(log, opt) == 0 and log.z == opt.z_spec()  # a new log adopts the optimizer's z
    for step in range(5):
        opt.step(lambda: (params[0] ** 2).sum())
        log.append(step, opt.history.pop())
    assert log.header["z"] == opt.z_spec()
    again = model()
    same = MeZO(again, lr=1e-2, eps=1e-3, seed=3, generator="table", chunk_size=16)
    assert replay(TrajectoryLog(tmp_path), same, expect_steps=5) == 5
    assert torch.equal(again[0], params[0])
    with pytest.raises(FtlabError, match="holds 5 step.s. but 6 were expected: the log stops early"):
        replay(TrajectoryLog(tmp_path), MeZO(model(), seed=3, generator="table", chunk_size=16), expect_steps=6)


def test_replay_refuses_a_log_from_another_run(tmp_path):
    log = _log(tmp_path, z=None)
    opt = MeZO([torch.nn.Parameter(torch.zeros(3))], seed=0)
    with pytest.raises(FtlabError, match="belongs to another run"):
        replay(log, opt)


# -- faults: other z settings -------------------------------------------------------------------------
def test_a_log_of_other_z_settings_is_refused(tmp_path):
    _log(tmp_path)
    other = {**Z, "generator": "torch", "chunk_size": 65536}
    with pytest.raises(FtlabError, match=r"trajectory.bin was recorded with chunk_size=1000, generator='table'; "
                                         r"this run uses chunk_size=65536, generator='torch'"):
        TrajectoryLog(tmp_path, z=other)
    TrajectoryLog(tmp_path, z=dict(Z))  # the same settings: fine
    opt = MeZO([torch.nn.Parameter(torch.zeros(3))], generator="torch", chunk_size=1000)
    with pytest.raises(FtlabError, match=r"recorded with generator='table'; this MeZO uses generator='torch'"):
        replay(TrajectoryLog(tmp_path), opt)
    rademacher = MeZO([torch.nn.Parameter(torch.zeros(3))], generator="table", chunk_size=1000,
                      distribution="rademacher")
    with pytest.raises(FtlabError, match="distribution='gaussian'; this MeZO uses distribution='rademacher'"):
        replay(TrajectoryLog(tmp_path), rademacher)


# -- faults: flipped bits -------------------------------------------------------------------------
def _field(offset, head):
    """Which part of the log byte ``offset`` belongs to."""
    if offset < head:
        return "magic" if offset < 8 else "version" if offset < 12 else "length" if offset < 16 else \
            "crc" if offset >= head - 4 else "json"
    return ["step"] * 4 + ["seed"] * 4 + ["g"] * 4 + ["lr"] * 4 + ["crc"] * 4


def test_every_flipped_bit_is_refused_and_located(tmp_path):
    log = _log(tmp_path, [ZOStep([11, 12], [0.5, -1.0], 1e-3, 1.0), ZOStep([13, 14], [0.25, 2.0], 5e-4, 1.0)])
    good = log.path.read_bytes()
    head = _header_size(log)
    seen = {}
    for offset in range(len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[offset] ^= 1 << bit
            log.path.write_bytes(bytes(bad))
            for allow in (False, True):  # a resume refuses it too
                with pytest.raises(FtlabError) as err:
                    list(TrajectoryLog(tmp_path).steps(allow_torn_tail=allow))
                msg = str(err.value)
                assert msg.startswith(str(log.path)) and "\n" not in msg
                if offset < head:
                    assert "header" in msg, (offset, bit, msg)
                else:
                    index = (offset - head) // RECORD.size
                    assert f"record {index} " in msg and "checksum mismatch" in msg, (offset, bit, msg)
                    assert f"byte offset {head + index * RECORD.size};" in msg
            kind = "header " + _field(offset, head) if offset < head else \
                "record " + _field(offset, head)[(offset - head) % RECORD.size]
            seen[kind] = seen.get(kind, 0) + 1
    assert set(seen) == {"header magic", "header version", "header length", "header json", "header crc",
                         "record step", "record seed", "record g", "record lr", "record crc"}
    assert sum(seen.values()) == 8 * len(good)


# -- faults: cut short -------------------------------------------------------------------------
@pytest.mark.parametrize("cut", range(1, RECORD.size))
def test_a_log_cut_inside_its_last_record(tmp_path, cut):
    log = _log(tmp_path)
    size = log.path.stat().st_size
    with log.path.open("r+b") as f:
        f.truncate(size - cut)
    with pytest.raises(FtlabError, match=rf"log ends with a partial record at byte {size - RECORD.size} "
                                         rf"\({RECORD.size - cut} of 20 bytes\): cut short"):
        list(log.steps())
    with pytest.raises(FtlabError, match="partial record"):  # ftlab replay of a finished run
        replay(log, MeZO([torch.nn.Parameter(torch.zeros(3))], seed=0, generator="table", chunk_size=1000))
    # A resume (what a kill mid-append leaves) drops the torn step, then truncates.
    assert [s for s, _ in log.steps(allow_torn_tail=True)] == [0, 1]
    with pytest.raises(FtlabError, match="partial record"):  # and appending to it is refused
        log.append(2, STEPS[2])
    log.truncate(2)
    assert log.path.stat().st_size == size - RECORD.size
    log.append(2, STEPS[2])
    assert [s for s, _ in log.steps()] == [0, 1, 2]


def test_a_log_cut_inside_a_step_or_the_header(tmp_path):
    two = [ZOStep([1, 2], [0.5, 0.5], 1e-3, 1.0), ZOStep([3, 4], [0.5, 0.5], 1e-3, 1.0)]
    log = _log(tmp_path, two)
    size = log.path.stat().st_size
    with log.path.open("r+b") as f:
        f.truncate(size - RECORD.size)  # a whole record, mid-step
    with pytest.raises(FtlabError, match="step 1 has 1 record.s. where the log holds 2 per step"):
        list(log.steps())
    assert [s for s, _ in log.steps(allow_torn_tail=True)] == [0]
    for keep in (_header_size(log) - 1, 14, 8, 5, 0):
        with log.path.open("r+b") as f:
            f.truncate(keep)
        with pytest.raises(FtlabError, match="cut short inside its header"):
            list(TrajectoryLog(tmp_path).steps(allow_torn_tail=True))


def test_truncate_keeps_whole_steps_atomically(tmp_path):
    log = _log(tmp_path)
    head = _header_size(log)
    log.truncate(5)  # nothing to drop
    log.truncate(2)
    assert [s for s, _ in log.steps()] == [0, 1] and log.path.stat().st_size == head + 2 * RECORD.size
    log.truncate(0)
    assert list(log.steps()) == [] and log.path.stat().st_size == head
    log.append(0, STEPS[0])
    assert [s for s, _ in log.steps()] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.bin"]


def test_truncate_refuses_damage_in_the_steps_it_keeps(tmp_path):
    log = _log(tmp_path)
    raw = bytearray(log.path.read_bytes())
    head = _header_size(log)
    raw[head + RECORD.size + 5] ^= 4  # record 1
    log.path.write_bytes(bytes(raw))
    with pytest.raises(FtlabError, match="record 1 .*checksum mismatch"):
        log.truncate(3)
    assert log.path.read_bytes() == bytes(raw)  # left as it is
    log.truncate(1)  # records after step 0 are dropped unread
    assert [s for s, _ in log.steps()] == [0]
    raw = bytearray(log.path.read_bytes())
    raw[head] ^= 1
    log.path.write_bytes(bytes(raw))
    assert replay(log, MeZO([torch.nn.Parameter(torch.zeros(3))], generator="table", chunk_size=1000), steps=0) == 0
    log.truncate(0)
    assert list(log.steps()) == []


def test_a_resume_reads_nothing_after_its_checkpoint(tmp_path):
    opt = MeZO([torch.nn.Parameter(torch.zeros(3))], seed=0, generator="table", chunk_size=1000)
    log = _log(tmp_path, [ZOStep(opt.draw_seeds(), [0.5], 1e-3, 1.0) for _ in range(4)])
    raw = bytearray(log.path.read_bytes())
    raw[_header_size(log) + 2 * RECORD.size + 3] ^= 0x80  # record 2: written after the step-2 checkpoint
    log.path.write_bytes(bytes(raw))
    with pytest.raises(FtlabError, match="record 2 .*checksum mismatch"):
        replay(log, MeZO([torch.nn.Parameter(torch.zeros(3))], seed=0, generator="table", chunk_size=1000))
    again = MeZO([torch.nn.Parameter(torch.zeros(3))], seed=0, generator="table", chunk_size=1000)
    assert replay(log, again, steps=2, allow_torn_tail=True) == 2
    log.truncate(2)
    assert [s for s, _ in log.steps()] == [0, 1]


# -- faults: several writers, gaps and splices -------------------------------------------------------
def test_two_writers_of_the_same_steps_are_refused(tmp_path):
    # What two unsynchronised processes leave: their records interleaved.
    log = _raw_log(tmp_path, [(0, 11, 0.5, 1e-3), (0, 11, 0.5, 1e-3), (1, 12, 0.5, 1e-3), (1, 12, 0.5, 1e-3)])
    with pytest.raises(FtlabError, match=r"record 1 at byte offset \d+ repeats step 0 \(seed 11\): two processes"):
        list(log.steps())
    other = _raw_log(tmp_path / "x", [(0, 11, 0.5, 1e-3), (0, 99, 0.5, 1e-3)])  # two runs' seeds
    with pytest.raises(FtlabError, match="record 1 .* repeats step 0 .seed 99."):
        list(other.steps())
    # Through the API the second writer is stopped at its first append.
    a, b = TrajectoryLog(tmp_path / "y", z=Z), TrajectoryLog(tmp_path / "y", z=Z)
    a.append(0, STEPS[0])
    with pytest.raises(FtlabError, match="cannot append step 0 after step 0: another process"):
        b.append(0, STEPS[0])
    a.append(1, STEPS[1])
    with pytest.raises(FtlabError, match="holds 1 perturbation.s. per step; step 2 has 2"):
        b.append(2, ZOStep([1, 2], [0.0, 0.0], 0.0, 0.0))
    assert [s for s, _ in a.steps()] == [0, 1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_appending_at_once_leave_a_valid_log(tmp_path):
    pids = []
    for seed in (100, 200):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the children
            code = 0
            try:
                log = TrajectoryLog(tmp_path, z=Z)
                for step in range(200):
                    log.append(step, ZOStep([seed + step], [0.5], 1e-3, 1.0))
            except FtlabError:
                code = 3
            finally:
                os._exit(code)
        pids.append(pid)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids)
    assert codes == [0, 3]  # one wins, the other is stopped at once
    steps = list(TrajectoryLog(tmp_path).steps())
    assert [s for s, _ in steps] == list(range(200))
    assert len({r.seeds[0] - s for s, r in steps}) == 1  # all from one writer


@pytest.mark.parametrize("records, message", [
    ([(1, 11, 0.5, 1e-3)], "record 0 .* skips to step 1 where step 0 was due"),
    ([(0, 11, 0.5, 1e-3), (1, 12, 0.5, 1e-3), (3, 14, 0.5, 1e-3)], r"record 2 .* skips to step 3 where step 2 was "
                                                                    r"due.*steps 0\.\.1 are intact"),
    ([(0, 11, 0.5, 1e-3), (1, 12, 0.5, 1e-3), (0, 11, 0.5, 1e-3)], "record 2 .* goes back to step 0 where step 2 "
                                                                    "was due"),
])
def test_gaps_and_restarts_are_refused(tmp_path, records, message):
    with pytest.raises(FtlabError, match=message):
        list(_raw_log(tmp_path, records).steps())


def test_append_must_continue_the_log(tmp_path):
    log = _log(tmp_path)
    with pytest.raises(FtlabError, match="cannot append step 5 after step 2"):
        log.append(5, STEPS[0])
    with pytest.raises(FtlabError, match="cannot append step 0 after step 2.*not truncated"):
        TrajectoryLog(tmp_path).append(0, STEPS[0])
    with pytest.raises(FtlabError, match="cannot append step 1 after step -1"):
        TrajectoryLog(tmp_path / "new").append(1, STEPS[0])


# -- faults: other files and formats -------------------------------------------------------------------------
def test_old_foreign_and_future_logs_are_refused(tmp_path):
    path = tmp_path / "trajectory.bin"
    path.write_bytes(b"".join(struct.pack("<IIff", s, 10 + s, 0.5, 1e-3) for s in range(3)))  # format 1
    with pytest.raises(FtlabError, match="version-1 trajectory log, written by an older ftlab without checksums: "
                                         "it cannot be checked"):
        list(TrajectoryLog(tmp_path).steps())
    with pytest.raises(FtlabError, match="version-1"):
        TrajectoryLog(tmp_path).append(3, STEPS[0])
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a log")
    with pytest.raises(FtlabError, match="is not an ftlab trajectory log"):
        list(TrajectoryLog(tmp_path).steps())
    blob = b'{"perturbations":1,"run_id":null,"z":null}'
    head = PREFIX.pack(MAGIC, 3, len(blob)) + blob
    path.write_bytes(head + struct.pack("<I", zlib.crc32(head)))
    with pytest.raises(FtlabError, match="version-3 trajectory log; this ftlab reads version 2: upgrade ftlab"):
        list(TrajectoryLog(tmp_path).steps())


def test_the_checksum_covers_every_record_field(tmp_path):
    assert PAYLOAD.size == 16 and RECORD.size == 20
    rec = pack_record(7, 123, 0.5, 1e-3)
    assert RECORD.unpack(rec)[:2] == (7, 123) and RECORD.unpack(rec)[4] == zlib.crc32(rec[:16])
