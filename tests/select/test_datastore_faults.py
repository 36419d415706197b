"""Datastore fault injection: flipped bits in shards, malformed or hostile manifests, old
manifests. Every fault is a one-line FtlabError naming the file (and the manifest field), never
a wrong row, a KeyError or a read outside the store folder."""

import hashlib
import json
import zlib

import numpy as np
import pytest

import ftlab.select.datastore as ds
from ftlab.errors import FtlabError
from ftlab.select import Datastore, DatastoreWriter, merge_datastores
from ftlab.select.datastore import MANIFEST

DIM = 6
FIELDS = dict(model="tiny", checkpoint="epoch-1", grad_type="adam", dim=DIM)


def _store(path, n=10, shard_rows=4, dtype="float16", source="a.jsonl"):
    ids = [f"{source}:{i}" for i in range(n)]
    x = np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) / 7
    writer = DatastoreWriter(path, **FIELDS, dtype=dtype, shard_rows=shard_rows)
    writer.append(ids, x)
    return writer.close()


def _manifest(path):
    return json.loads((path / MANIFEST).read_text())


def _set_manifest(path, d):
    (path / MANIFEST).write_text(d if isinstance(d, str) else json.dumps(d))


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- flipped bits in shard data -------------------------------------------------------------------------
def test_shards_carry_a_crc32_and_a_sha256(tmp_path):
    store = _store(tmp_path / "s")
    for shard in store.manifest.shards:
        raw = (tmp_path / "s" / shard["file"]).read_bytes()
        assert shard["crc32"] == zlib.crc32(raw) and shard["sha256"] == hashlib.sha256(raw).hexdigest()


def test_every_flipped_byte_of_a_shard_is_caught_before_it_is_read(tmp_path):
    good = _store(tmp_path / "s")
    want = good.read(0, len(good))
    shard = tmp_path / "s" / good.manifest.shards[1]["file"]  # rows 4..7
    data = shard.read_bytes()
    for offset in range(len(data)):
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset % 8)
        shard.write_bytes(bytes(bad))
        store = Datastore.open(tmp_path / "s")  # sizes and ids still agree: opening is fine
        assert np.array_equal(store.read(0, 4), want[:4])  # shard 0 is intact and readable
        for read in (lambda store=store: store.read(2, 6), lambda store=store: store.take([9, 5]),
                     lambda store=store: list(store.iter_chunks(3))):
            with pytest.raises(FtlabError, match=r"shard-00001.bin does not match its checksum \(crc32; "
                                                 r"corrupted on disk or in a copy\); delete .* and rewrite it") as e:
                read()
            _one_line(e)
        with pytest.raises(FtlabError, match="shard-00001.bin does not match its checksum .sha256"):
            store.verify()
        unchecked = Datastore.open(tmp_path / "s", verify=False)  # the opt-out reads what is there
        assert not np.array_equal(unchecked.read(4, 8), want[4:8], equal_nan=True)
    shard.write_bytes(data)
    assert np.array_equal(Datastore.open(tmp_path / "s").read(0, 10), want)


def test_each_shard_is_checked_once(tmp_path, monkeypatch):
    store = Datastore.open(_store(tmp_path / "s", n=12).path)
    calls = []
    real = ds.file_digest
    monkeypatch.setattr(ds, "file_digest", lambda file, kind: calls.append((file.name, kind)) or real(file, kind))
    for _ in range(3):
        store.read(0, 12)
        store.take([11, 0])
    assert calls == [("shard-00000.bin", "crc32"), ("shard-00001.bin", "crc32"), ("shard-00002.bin", "crc32")]


def test_a_corrupted_part_is_caught_by_a_merge(tmp_path):
    a, b = _store(tmp_path / "a", n=4), _store(tmp_path / "b", n=4, source="b.jsonl")
    shard = tmp_path / "b" / b.manifest.shards[0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(FtlabError, match="b/shard-00000.bin does not match its checksum"):
        merge_datastores([a.path, b.path], tmp_path / "m")


def test_old_manifests(tmp_path):
    path = _store(tmp_path / "s").path
    want = Datastore.open(path).read(0, 10)
    m = _manifest(path)
    for shard in m["shards"]:  # written before the CRC-32: checked with the SHA-256
        del shard["crc32"]
    _set_manifest(path, m)
    shard = path / m["shards"][2]["file"]
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 2
    shard.write_bytes(bytes(raw))
    with pytest.raises(FtlabError, match=r"shard-00002.bin does not match its checksum \(sha256"):
        Datastore.open(path).read(0, 10)
    for shard_ in m["shards"]:  # no checksum at all: opened and read unverified, verify() says so
        del shard_["sha256"]
    _set_manifest(path, m)
    store = Datastore.open(path)
    assert np.array_equal(store.read(0, 8), want[:8])
    with pytest.raises(FtlabError, match="lists no checksum for shard shard-00000.bin: it cannot be verified"):
        store.verify()


# -- hostile file names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["file", "ids"])
@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/shard.bin", "..", ".", "", "a\\b.bin",
                                  "nul\0byte", 7, None])
def test_shard_names_must_stay_inside_the_folder(tmp_path, key, name):
    path = _store(tmp_path / "s").path
    (tmp_path / "outside.bin").write_bytes(b"\0" * 48)
    m = _manifest(path)
    m["shards"][1][key] = name
    _set_manifest(path, m)
    for open_ in (Datastore.open, lambda p: DatastoreWriter(p, **FIELDS, dtype="float16")):
        with pytest.raises(FtlabError) as e:
            open_(path)
        assert _one_line(e).startswith(f"{path / MANIFEST}: field 'shards[1].{key}' must be a plain file name "
                                       f"inside the datastore folder, got ")


def test_two_shards_naming_one_file_are_refused(tmp_path):
    path = _store(tmp_path / "s").path
    m = _manifest(path)
    m["shards"][2]["file"] = m["shards"][0]["file"]
    _set_manifest(path, m)
    with pytest.raises(FtlabError, match=r"field 'shards\[2\].file' names 'shard-00000.bin', already used by shard 0"):
        Datastore.open(path)


# -- malformed manifests --------------------------------------------------------------------------------
def _mutations():
    """(label, mutate(manifest dict) -> manifest dict or text, the field the error names)."""
    def drop(key):
        return lambda m: {k: v for k, v in m.items() if k != key}

    def put(key, value):
        return lambda m: {**m, key: value}

    def put_shard(key, value, k=0):
        def f(m):
            m["shards"][k] = {**m["shards"][k], key: value}
            return m
        return f

    def drop_shard(key):
        def f(m):
            del m["shards"][0][key]
            return m
        return f

    cases = [(f"missing {k}", drop(k), k) for k in ("model", "checkpoint", "grad_type", "dim", "dtype", "shards",
                                                      "complete")]
    cases += [(f"missing shards[0].{k}", drop_shard(k), f"shards[0].{k}") for k in ("file", "ids", "rows", "bytes")]
    cases += [
        ("dim as text", put("dim", "6"), "dim"), ("dim bool", put("dim", True), "dim"), ("dim 0", put("dim", 0), "dim"),
        ("dim float", put("dim", 6.0), "dim"), ("model null", put("model", None), "model"),
        ("checkpoint number", put("checkpoint", 1), "checkpoint"),
        ("grad_type list", put("grad_type", []), "grad_type"),
        ("dtype int8", put("dtype", "int8"), "dtype"), ("dtype null", put("dtype", None), "dtype"),
        ("projection list", put("projection", [1]), "projection"), ("extra null", put("extra", None), "extra"),
        ("shards object", put("shards", {"0": {}}), "shards"), ("shards null", put("shards", None), "shards"),
        ("complete text", put("complete", "yes"), "complete"), ("version text", put("version", "1"), "version"),
        ("shard text", lambda m: {**m, "shards": ["shard-00000.bin"]}, "shards[0]"),
        ("rows negative", put_shard("rows", -1), "shards[0].rows"),
        ("rows text", put_shard("rows", "4"), "shards[0].rows"),
        ("bytes float", put_shard("bytes", 48.0), "shards[0].bytes"),
        ("crc32 negative", put_shard("crc32", -5), "shards[0].crc32"),
        ("crc32 text", put_shard("crc32", "abc"), "shards[0].crc32"),
        ("sha256 short", put_shard("sha256", "abc"), "shards[0].sha256"),
        ("projection dim_out text", put("projection", {"dim_out": "6"}), "projection.dim_out"),
    ]
    return cases


MUTATIONS = _mutations()


@pytest.mark.parametrize("label, mutate, field", MUTATIONS, ids=[c[0] for c in MUTATIONS])
def test_a_malformed_manifest_names_its_field(tmp_path, label, mutate, field):
    path = _store(tmp_path / "s").path
    _set_manifest(path, mutate(_manifest(path)))
    for open_ in (Datastore.open, lambda p: DatastoreWriter(p, **FIELDS, dtype="float16")):
        with pytest.raises(FtlabError) as e:
            open_(path)
        assert _one_line(e).startswith(f"{path / MANIFEST}: field {field!r} "), str(e.value)


@pytest.mark.parametrize("text, message", [
    ("", "is not a datastore manifest .Expecting value"),
    ('{"model": "tiny", "dim": ', "is not a datastore manifest .Expecting value"),  # cut short
    ("[1, 2]", r"is not a datastore manifest \(a JSON list, not an object\)"),
    ("null", r"is not a datastore manifest \(a JSON NoneType, not an object\)"),
    ('"text"', "is not a datastore manifest"),
    ("\udcff", "is not a datastore manifest"),
])
def test_a_manifest_that_is_not_a_json_object(tmp_path, text, message):
    path = _store(tmp_path / "s").path
    (path / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FtlabError, match=message) as e:
        Datastore.open(path)
    assert _one_line(e).startswith(str(path / MANIFEST))


def test_newer_manifests_and_bad_ids_files(tmp_path):
    path = _store(tmp_path / "s").path
    m = _manifest(path)
    _set_manifest(path, {**m, "version": 9})
    with pytest.raises(FtlabError, match="manifest.json: datastore manifest version 9 .* newer than this ftlab"):
        Datastore.open(path)
    _set_manifest(path, {**m, "shard_index": {}})
    with pytest.raises(FtlabError, match=r"fields \['shard_index'\] is newer than this ftlab"):
        Datastore.open(path)
    _set_manifest(path, m)
    (path / m["shards"][0]["ids"]).write_text(json.dumps({"a": 1, "b": 2, "c": 3, "d": 4}))
    with pytest.raises(FtlabError, match="shard-00000.ids.json is not a JSON list of strings"):
        Datastore.open(path)
    (path / m["shards"][0]["ids"]).write_text(json.dumps([1, 2, 3, 4]))
    with pytest.raises(FtlabError, match="is not a JSON list of strings"):
        Datastore.open(path)
    (path / m["shards"][0]["ids"]).write_bytes(b"\xff\xfe")
    with pytest.raises(FtlabError, match="shard-00000.ids.json is unreadable"):
        Datastore.open(path)
