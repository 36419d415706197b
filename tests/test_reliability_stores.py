"""Issue 28's audit, part 3: the probe feature store, LESS's datastores and configs, ``tint build
--output``. Every fault below is a one-line FtlabError naming the file or field and what to do:
never a traceback, never silently other features, another example's score or a deleted folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ftlab.config import ConfigError, load_config
from ftlab.errors import FtlabError
from ftlab.probe.cache import split_features
from ftlab.probe.features import FeatureSpec
from ftlab.probe.store import FeatureStore, model_fingerprint
from ftlab.select import DatastoreWriter, ProjectionSpec, less_scores, select_top
from ftlab.select.datastore import Datastore
from ftlab.select.pipeline import SelectConfig
from ftlab.tasks.base import Example, TaskSpec


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# -- the probe feature store ----------------------------------------------------------------------------
TASK = TaskSpec(name="toy", template="{text} It was", options=[" great", " terrible"])
TEXTS = ["the movie was great", "a terrible film", "good acting", "bad plot", "a great story", "it was bad"]
EXAMPLES = [Example(id=f"toy:{i}", fields={"text": t}, label=i % 2) for i, t in enumerate(TEXTS)]
FSPEC = FeatureSpec(("f",))


@pytest.fixture
def probe_store(tmp_path, tiny_model, tiny_tokenizer):
    """``(compute, chunk files, fresh features)``: ``compute()`` reruns the store's feature pass."""
    store = FeatureStore(tmp_path, "tiny", model_fingerprint(tiny_model))

    def compute():
        return split_features(tiny_model, tiny_tokenizer, TASK, EXAMPLES, "train", FSPEC, store, chunk_rows=2)["f"]

    fresh = compute()
    chunks = sorted((tmp_path / "toy" / "train" / "f").glob("chunk-*.npy"))
    assert len(chunks) == 3
    return compute, chunks, fresh


def test_a_flipped_byte_of_a_probe_chunk_is_caught_wherever_it_is(probe_store):
    compute, chunks, fresh = probe_store
    chunk = chunks[1]
    data = chunk.read_bytes()
    # The header (dtype, shape) and the rows: every flip must be refused, none read as other features.
    for offset in sorted({*range(0, 128, 5), *range(128, len(data), 37), len(data) - 1}):
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset % 8)
        chunk.write_bytes(bytes(bad))
        with pytest.raises(FtlabError, match=r"feature chunk .*chunk-00001.npy does not match its checksum "
                                             r"\(crc32; .*\); delete it and rerun the command") as e:
            compute()
        _one_line(e)
    chunk.unlink()  # what the message says to do: the chunk is recomputed, identical
    np.testing.assert_array_equal(compute(), fresh)


def test_a_truncated_probe_chunk_is_one_line_and_recomputed_once_deleted(probe_store):
    compute, chunks, fresh = probe_store
    data = chunks[0].read_bytes()
    for keep in (0, 10, len(data) // 2, len(data) - 1):
        chunks[0].write_bytes(data[:keep])
        with pytest.raises(FtlabError, match=rf"feature chunk .*chunk-00000.npy has {keep} bytes, not the "
                                             rf"{len(data)} it was written with \(truncated") as e:
            compute()
        _one_line(e)
    chunks[0].unlink()
    np.testing.assert_array_equal(compute(), fresh)


def test_an_object_dtype_probe_chunk_is_never_unpickled(probe_store, monkeypatch):
    compute, chunks, _ = probe_store
    loads = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: loads.append(kw.get("allow_pickle", False)) or real(*a, **kw))
    np.save(chunks[2], np.array([[1.0, "x"], [2.0, "y"]], dtype=object), allow_pickle=True)
    with pytest.raises(FtlabError, match=r"feature chunk .*chunk-00002.npy (has \d+ bytes|does not match)") as e:
        compute()
    _one_line(e)
    # Even listed with its own size and checksums (a copied store), it is refused, not unpickled.
    from ftlab.io import checksums

    listing = chunks[2].parent / "chunks.json"
    record = json.loads(listing.read_text())
    raw = chunks[2].read_bytes()
    record["chunks"][2].update(bytes=len(raw), **checksums(raw))
    listing.write_text(json.dumps(record))
    with pytest.raises(FtlabError, match=r"feature chunk .*chunk-00002.npy is unreadable \(Object arrays") as e:
        compute()
    _one_line(e)
    assert not any(loads)  # nothing was loaded with allow_pickle


def test_a_damaged_chunk_list_is_one_line(probe_store):
    compute, chunks, _ = probe_store
    listing = chunks[0].parent / "chunks.json"
    record = json.loads(listing.read_text())
    for damaged in ("{", json.dumps({"chunks": 3}), json.dumps({"chunks": [{**record["chunks"][0], "file": "../x"}]})):
        listing.write_text(damaged)
        with pytest.raises(FtlabError, match="chunks.json: damaged feature-store file") as e:
            compute()
        _one_line(e)


def test_a_store_written_before_chunks_json_is_recomputed_not_trusted(probe_store):
    compute, chunks, fresh = probe_store
    (chunks[0].parent / "chunks.json").unlink()  # as an older ftlab left it: chunk files, no checksums
    chunks[1].write_bytes(chunks[1].read_bytes()[:-4] + b"\0\0\0\0")  # silently other rows, same size
    np.testing.assert_array_equal(compute(), fresh)


# -- LESS: the ids of the warm-up checkpoints' datastores -----------------------------------------------
DIM = 8
SPEC = ProjectionSpec(dim_in=100, dim_out=DIM, seed=0)


def _checkpoint_stores(tmp_path):
    """Two checkpoints' train stores of 6 examples, 'pool.jsonl:3' clearly the best for the target."""
    rng = np.random.default_rng(0)
    target = rng.standard_normal((2, DIM)).astype(np.float32)
    ids = [f"pool.jsonl:{i}" for i in range(6)]
    train, targets = [], []
    for c in (1, 2):
        x = rng.standard_normal((6, DIM)).astype(np.float32)
        x[3] = target.mean(0) * 3
        fields = dict(model="tiny", checkpoint=f"epoch-{c}", dim=DIM, projection=SPEC, dtype="float32", shard_rows=4)
        w = DatastoreWriter(tmp_path / f"train-{c}", grad_type="adam", **fields)
        w.append(ids, x)
        train.append(w.close().path)
        w = DatastoreWriter(tmp_path / f"target-{c}", grad_type="sgd", **fields)
        w.append(["t.jsonl:1", "t.jsonl:2"], target)
        targets.append(w.close().path)
    return train, targets


def _best(train, targets):
    stores = [Datastore.open(p) for p in train]
    scores = less_scores(stores, [Datastore.open(p) for p in targets], [1e-4, 5e-5])
    return stores[0].ids[select_top(scores, stores[0].ids, k=1)[0]]


def _swap_ids(store, a, b):
    """Swap ids ``a`` and ``b`` in the store's ids files (a hand edit, or a bad copy)."""
    for ids_file in sorted(store.glob("shard-*.ids.json")):
        ids = json.loads(ids_file.read_text())
        ids = [b if i == a else a if i == b else i for i in ids]
        ids_file.write_text(json.dumps(ids))


def test_ids_swapped_in_both_checkpoints_are_refused_not_ranked_first(tmp_path):
    train, targets = _checkpoint_stores(tmp_path)
    assert _best(train, targets) == "pool.jsonl:3"
    for store in train:  # the same swap in both: the checkpoints agree, the rows do not
        _swap_ids(store, "pool.jsonl:3", "pool.jsonl:0")
    with pytest.raises(FtlabError, match=r"ids file .*train-1/shard-00000.ids.json does not match its checksum "
                                         r"\(ids_sha256.*\); delete .*train-1 and rewrite it") as e:
        _best(train, targets)  # before: scored, and 'pool.jsonl:0' ranked first
    _one_line(e)


def test_ids_of_checkpoints_that_disagree_are_refused(tmp_path):
    train, targets = _checkpoint_stores(tmp_path)
    for store in train:  # stores written before ids_sha256: only the comparison across checkpoints is left
        manifest = json.loads((store / "manifest.json").read_text())
        for shard in manifest["shards"]:
            del shard["ids_sha256"]
        (store / "manifest.json").write_text(json.dumps(manifest))
    _swap_ids(train[1], "pool.jsonl:3", "pool.jsonl:0")
    with pytest.raises(FtlabError, match=r"train-2 lists other example ids \(or another order\) than the store of "
                                         r"checkpoint 0") as e:
        _best(train, targets)
    _one_line(e)


def test_stored_rows_of_examples_not_in_the_files_are_one_line(tmp_path):
    from ftlab.select.data import InstructionExample
    from ftlab.select.pipeline import groups_of

    _, targets = _checkpoint_stores(tmp_path)
    other = [InstructionExample(id=f"other.jsonl:{i}", messages=(), response="r", task="qa", family="qa")
             for i in (1, 2)]
    with pytest.raises(FtlabError, match=r"target-1 holds features of 2 examples that are not in the targets files "
                                         r"\(e.g. 't.jsonl:1'\)") as e:
        groups_of(Datastore.open(targets[0]), other)  # before: KeyError
    _one_line(e)


# -- select: sizes refused in the config, before the warm-up runs ---------------------------------------
@pytest.mark.parametrize("override, field", [("batch_size=0", "batch_size"), ("batch_size=-3", "batch_size"),
                                             ("warmup.batch_size=0", "warmup.batch_size"),
                                             ("top_k=0", "top_k"), ("top_k=-1", "top_k")])
def test_select_sizes_are_checked_up_front(override, field):
    with pytest.raises(ConfigError, match=rf"config.{field}: must be >= 1") as e:
        load_config(SelectConfig, None, ["percentage=null", "top_k=5", override])
    _one_line(e)


# -- tint build --output ------------------------------------------------------------------------------------
MEASURED = {"inner": {"parameters": 10, "layers": 1, "seconds": 0.1, "peak_mib_growth": 1.0},
            "reference_step": {"seconds": 0.1}, "tokens": {"total": 24, "train": 16},
            "tint": {"prefix": 5, "buffers": 1, "dense_equivalent": 9, "hidden_size": 8, "n_prefixes": 8,
                     "prefix_tokens": 8, "build_seconds": 0.1, "seconds": 0.1, "peak_mib_growth": 2.0},
            "check": {"max_abs_diff": 0.0, "logit_scale": 1.0, "same_argmax": True}}


@pytest.fixture
def build(monkeypatch):
    """``build(*args) -> (result, measured?)``: ``ftlab tint build`` with the measurement faked."""
    import ftlab.tint.costs as costs
    from ftlab.cli.tint import app

    calls = []
    monkeypatch.setattr(costs, "measure", lambda cfg: calls.append(cfg) or MEASURED)

    def run(*args):
        calls.clear()
        result = CliRunner().invoke(app, ["build", "n_tokens=24", "n_train=16", *args])
        return result, bool(calls)

    return run


def test_tint_build_output_never_replaces_a_folder_or_a_foreign_file(tmp_path, build):
    folder = tmp_path / "results"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("mine")
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    for path, flags, message in [(folder, [], "is a folder; give the path of a JSON file"),
                                 (folder, ["--overwrite"], "is a folder; give the path of a JSON file"),
                                 (foreign, ["--overwrite"], "exists and is not the JSON of an earlier tint build"),
                                 (foreign / "x.json", [], "is a file, not a folder")]:
        result, measured = build("--output", str(path), *flags)
        assert isinstance(result.exception, FtlabError), result.output
        assert message in str(result.exception) and "\n" not in str(result.exception)
        assert not measured  # refused before the minutes of measuring
    assert (folder / "keep.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert foreign.read_text() == '{"mine": true}'


def test_tint_build_output_replaces_an_earlier_build_only_with_overwrite(tmp_path, build):
    out = tmp_path / "sub" / "build.json"
    result, _ = build("--output", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    first = json.loads(out.read_text())
    assert first["config"]["n_tokens"] == 24 and first["check"] == MEASURED["check"]
    result, measured = build("n_tokens=32", "--output", str(out))
    assert isinstance(result.exception, FtlabError) and not measured
    assert "holds an earlier tint build; pass --overwrite" in str(result.exception)
    assert json.loads(out.read_text()) == first
    result, _ = build("n_tokens=32", "--output", str(out), "--overwrite")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(out.read_text())["config"]["n_tokens"] == 32
