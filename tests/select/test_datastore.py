"""Datastores: round trips, the row -> id mapping across shards and merges, resume after a kill,
and detection of truncated, missing or corrupted shards."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.select import Datastore, DatastoreWriter, ProjectionSpec, merge_datastores, write_distributed
from ftlab.select.datastore import MANIFEST
from ftlab.select.scoring import make_id, split_id

DIM = 6
FIELDS = dict(model="tiny", checkpoint="epoch-1", grad_type="adam", dim=DIM,
              projection=ProjectionSpec(dim_in=100, dim_out=DIM, sparsity=2))


def _ids(n: int) -> list[str]:
    """Ids from two source files, ``a.jsonl`` lines 1..n//2 then ``b.jsonl`` lines 1..rest."""
    half = n // 2
    return ([make_id("data/a.jsonl", i + 1) for i in range(half)]
            + [make_id("data/b.jsonl", i + 1) for i in range(n - half)])


def _features(ids: list[str]) -> np.ndarray:
    """Row features that encode their id: column 0 is the line, column 1 the file (0 for a, 1 for b)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    for r, id_ in enumerate(ids):
        source, line = split_id(id_)
        x[r, 0], x[r, 1] = line, source.endswith("b.jsonl")
    return x


def _write(path, ids, x, batch=5, **kw) -> Datastore:
    writer = DatastoreWriter(path, **{**FIELDS, **kw})
    for s in range(0, len(ids), batch):
        writer.append(ids[s:s + batch], x[s:s + batch])
    return writer.close()


def _assert_rows_match_ids(store: Datastore):
    """Every row's content names the same (file, line) as the id at that row."""
    x = store.read(0, len(store))
    for r, id_ in enumerate(store.ids):
        source, line = split_id(id_)
        assert (x[r, 0], x[r, 1]) == (line, source.endswith("b.jsonl")), (r, id_)


def _assert_same_store(a: Datastore, b: Datastore):
    assert a.ids == b.ids
    assert a.manifest.identity() == b.manifest.identity()
    assert np.array_equal(a.read(0, len(a)), b.read(0, len(b)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_across_shards(tmp_path, dtype):
    ids = _ids(23)
    x = _features(ids)
    store = _write(tmp_path / "s", ids, torch.from_numpy(x), dtype=dtype, shard_rows=4)
    want = x.astype(dtype).astype(np.float32)  # float16 rounds once, exactly like numpy's cast
    assert len(store) == 23 and store.dim == DIM and store.ids == ids
    assert [s["rows"] for s in store.manifest.shards] == [4, 4, 4, 4, 4, 3]
    assert np.array_equal(store.read(0, 23), want)
    assert np.array_equal(store.read(3, 13), want[3:13])  # spans three shards
    assert np.array_equal(store.take([22, 0, 5, 4, 17]), want[[22, 0, 5, 4, 17]])
    chunks = list(store.iter_chunks(7))
    assert [(s, len(c)) for s, c in chunks] == [(0, 7), (7, 7), (14, 7), (21, 2)]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), want)
    reopened = Datastore.open(tmp_path / "s")
    _assert_same_store(reopened, store)
    _assert_rows_match_ids(reopened)
    assert reopened.manifest.projection == FIELDS["projection"].to_dict()
    reopened.verify()


def test_shard_files_are_raw_little_endian(tmp_path):
    ids = _ids(3)
    x = _features(ids)
    store = _write(tmp_path / "s", ids, x, dtype="float16")
    raw = (tmp_path / "s" / store.manifest.shards[0]["file"]).read_bytes()
    assert raw == x.astype("<f2").tobytes()


def _kill_script(path, n_before_kill: int) -> str:
    """A process that writes the store batch by batch and SIGKILLs itself after some batches."""
    return textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_datastore import _ids, _features, FIELDS
        from ftlab.select import DatastoreWriter
        ids = _ids(40); x = _features(ids)
        w = DatastoreWriter({str(path)!r}, **FIELDS, shard_rows=6)
        for b, s in enumerate(range(0, 40, 5)):
            if b == {n_before_kill}:
                os.kill(os.getpid(), signal.SIGKILL)
            w.append(ids[s:s + 5], x[s:s + 5])
    """)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    ids = _ids(40)
    x = _features(ids)
    path = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _kill_script(path, 5)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # 25 rows appended, 4 full shards of 6 durable; the buffered 25th row died with the process.
    manifest = json.loads((path / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [6, 6, 6, 6] and not manifest["complete"]
    with pytest.raises(FtlabError, match="incomplete .24 rows written.; rerun"):
        Datastore.open(path)

    writer = DatastoreWriter(path, **FIELDS, shard_rows=6)
    assert writer.done_ids() == set(ids[:24])
    # Replaying every example (as a naive caller would) never duplicates a durable row.
    for s in range(0, 40, 5):
        writer.append(ids[s:s + 5], x[s:s + 5])
    resumed = writer.close()
    uninterrupted = _write(tmp_path / "full", ids, x, shard_rows=6)
    _assert_same_store(resumed, uninterrupted)
    assert resumed.manifest.shards == uninterrupted.manifest.shards  # same files, sizes, checksums
    _assert_rows_match_ids(resumed)


def test_kill_while_writing_a_shard_leaves_the_store_consistent(tmp_path, monkeypatch):
    ids = _ids(12)
    x = _features(ids)
    writer = DatastoreWriter(tmp_path / "s", **FIELDS, shard_rows=4)
    writer.append(ids[:4], x[:4])

    def dying_sha(*args):
        raise KeyboardInterrupt  # after the data file's rename, before the manifest lists it

    import ftlab.select.datastore as ds
    monkeypatch.setattr(ds.hashlib, "sha256", dying_sha)
    with pytest.raises(KeyboardInterrupt):
        writer.append(ids[4:8], x[4:8])
    monkeypatch.undo()
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["shards"][-1]["file"] == "shard-00000.bin"
    (tmp_path / "s" / "shard-00002.bin").write_bytes(b"orphan from an older run")
    resumed = DatastoreWriter(tmp_path / "s", **FIELDS, shard_rows=4)
    assert resumed.done_ids() == set(ids[:4])
    resumed.append(ids[4:], x[4:])
    _assert_same_store(resumed.close(), _write(tmp_path / "ref", ids, x, shard_rows=4))
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_truncated_missing_and_corrupted_shards_are_detected(tmp_path):
    ids = _ids(10)
    store = _write(tmp_path / "s", ids, _features(ids), shard_rows=4)
    shard = tmp_path / "s" / store.manifest.shards[1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    with pytest.raises(FtlabError, match=r"shard-00001.bin has 45 bytes but the manifest says 4 rows x 6 x "
                                         r"float16 = 48 \(truncated or replaced\); delete .* and rewrite it"):
        Datastore.open(tmp_path / "s")
    with pytest.raises(FtlabError, match="truncated"):  # a resuming writer refuses it too
        DatastoreWriter(tmp_path / "s", **FIELDS)
    flipped = bytearray(data)
    flipped[0] ^= 1
    shard.write_bytes(bytes(flipped))
    reopened = Datastore.open(tmp_path / "s")  # same size: only the checksum tells
    with pytest.raises(FtlabError, match="shard-00001.bin does not match its checksum"):
        reopened.verify()
    shard.unlink()
    with pytest.raises(FtlabError, match="shard-00001.bin is missing"):
        Datastore.open(tmp_path / "s")
    with pytest.raises(FtlabError, match="no datastore at .*manifest.json missing"):
        Datastore.open(tmp_path / "nothing")


def test_ids_file_must_match_rows(tmp_path):
    ids = _ids(8)
    store = _write(tmp_path / "s", ids, _features(ids), shard_rows=4)
    (tmp_path / "s" / store.manifest.shards[0]["ids"]).write_text(json.dumps(ids[:3]))
    with pytest.raises(FtlabError, match="lists 3 ids for 4 rows"):
        Datastore.open(tmp_path / "s")


def test_reopening_with_other_features_is_refused(tmp_path):
    ids = _ids(4)
    _write(tmp_path / "s", ids, _features(ids))
    with pytest.raises(FtlabError,
                       match=r"holds a datastore written with other settings .*'checkpoint': \('epoch-1', 'epoch-2'\)"):
        DatastoreWriter(tmp_path / "s", **{**FIELDS, "checkpoint": "epoch-2"})
    with pytest.raises(FtlabError, match="dtype"):
        DatastoreWriter(tmp_path / "s", **FIELDS, dtype="float32")


def test_bad_appends(tmp_path):
    writer = DatastoreWriter(tmp_path / "s", **FIELDS, shard_rows=100)
    with pytest.raises(FtlabError, match=r"shape \(2, 6\) for 2 ids, got \(2, 5\)"):
        writer.append(["a:1", "a:2"], np.zeros((2, 5)))
    writer.append(["a:1"], np.ones((1, DIM)))
    with pytest.raises(FtlabError, match="id 'a:1' appended twice"):
        writer.append(["a:1"], np.ones((1, DIM)))
    with pytest.raises(FtlabError, match="id 'a:3' appended twice"):
        writer.append(["a:3", "a:3"], np.ones((2, DIM)))
    bad = np.ones((2, DIM))
    bad[1, 2] = np.nan
    with pytest.raises(FtlabError, match="non-finite feature for id 'a:5'"):
        writer.append(["a:4", "a:5"], bad)
    with pytest.raises(FtlabError, match="non-finite feature for id 'a:6' .*beyond float16's range"):
        writer.append(["a:6"], np.full((1, DIM), 1e5))
    with pytest.raises(FtlabError, match="dtype must be one of"):
        DatastoreWriter(tmp_path / "t", **FIELDS, dtype="int8")
    with pytest.raises(FtlabError, match="differs from the projection's dim_out"):
        DatastoreWriter(tmp_path / "t", **{**FIELDS, "dim": 5})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merge_equals_a_single_store(tmp_path, dtype):
    ids = _ids(31)
    x = _features(ids)
    single = _write(tmp_path / "single", ids, x, dtype=dtype, shard_rows=4)
    # Consecutive parts: the default order (parts one after the other) is the original one.
    parts = [_write(tmp_path / f"p{k}", ids[a:b], x[a:b], dtype=dtype, shard_rows=3)
             for k, (a, b) in enumerate([(0, 10), (10, 11), (11, 31)])]
    merged = merge_datastores([p.path for p in parts], tmp_path / "merged", shard_rows=4)
    _assert_same_store(merged, single)
    assert merged.manifest.shards == single.manifest.shards
    # Strided parts (as ranks write them) with the original order restored.
    strided = [_write(tmp_path / f"r{r}", ids[r::3], x[r::3], dtype=dtype, shard_rows=2) for r in range(3)]
    merged = merge_datastores([p.path for p in strided], tmp_path / "merged-strided", order=ids, shard_rows=4)
    _assert_same_store(merged, single)
    _assert_rows_match_ids(merged)


def test_merge_resumes_after_a_kill(tmp_path, monkeypatch):
    ids = _ids(20)
    x = _features(ids)
    parts = [_write(tmp_path / f"r{r}", ids[r::2], x[r::2]) for r in range(2)]
    import ftlab.select.datastore as ds

    calls = {"n": 0}
    real = ds._gather

    def dies_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ds, "_gather", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        merge_datastores([p.path for p in parts], tmp_path / "m", order=ids, shard_rows=3)
    monkeypatch.undo()
    assert len(DatastoreWriter(tmp_path / "m", **FIELDS).done_ids()) == 6
    merged = merge_datastores([p.path for p in parts], tmp_path / "m", order=ids, shard_rows=3)
    _assert_same_store(merged, _write(tmp_path / "single", ids, x, shard_rows=3))


def test_merge_errors(tmp_path):
    ids = _ids(6)
    x = _features(ids)
    a = _write(tmp_path / "a", ids[:3], x[:3])
    b = _write(tmp_path / "b", ids[2:], x[2:])
    with pytest.raises(FtlabError, match="id 'data/a.jsonl:3' is in both .*a and .*b; parts must hold disjoint"):
        merge_datastores([a.path, b.path], tmp_path / "m")
    c = _write(tmp_path / "c", ids[3:], x[3:], checkpoint="epoch-2")
    with pytest.raises(FtlabError, match="cannot merge datastores: .* different features .*checkpoint"):
        merge_datastores([a.path, c.path], tmp_path / "m")
    d = _write(tmp_path / "d", ids[3:], x[3:])
    with pytest.raises(FtlabError, match="merge order lists 5 ids .5 distinct. but the parts hold 6"):
        merge_datastores([a.path, d.path], tmp_path / "m", order=ids[:5])


def test_write_distributed_in_one_process_matches_the_writer(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ids = _ids(17)
    x = _features(ids)
    seen = []

    def compute(idx):
        seen.append(list(idx))
        return torch.from_numpy(x[idx])

    store = write_distributed(tmp_path / "s", ids, compute, batch_size=4, shard_rows=5, **FIELDS)
    assert seen == [list(range(s, min(s + 4, 17))) for s in range(0, 17, 4)]
    _assert_same_store(store, _write(tmp_path / "ref", ids, x, shard_rows=5))
    # Rerunning a finished write computes nothing.
    again = write_distributed(tmp_path / "s", ids, compute, batch_size=4, shard_rows=5, **FIELDS)
    assert len(seen) == 5 and again.ids == ids
    with pytest.raises(FtlabError, match="already holds a complete datastore of other examples"):
        write_distributed(tmp_path / "s", ids[:-1], compute, batch_size=4, shard_rows=5, **FIELDS)
