"""LESS scores against a naive float64 reference, streaming, selection ties, output files and
the errors for stores that cannot be scored together."""

import csv
import json

import numpy as np
import pytest

from ftlab.errors import FtlabError
from ftlab.select import DatastoreWriter, ProjectionSpec, less_scores, select_top, write_selection
from ftlab.select.datastore import Datastore
from ftlab.select.scoring import make_id, split_id

DIM = 16
SPEC = ProjectionSpec(dim_in=1000, dim_out=DIM, seed=0)


def _store(path, x, ids=None, checkpoint="epoch-1", dtype="float32", shard_rows=5, **kw) -> Datastore:
    fields = dict(model="tiny", checkpoint=checkpoint, grad_type="adam", dim=x.shape[1], projection=SPEC)
    writer = DatastoreWriter(path, **{**fields, **kw}, dtype=dtype, shard_rows=shard_rows)
    writer.append(ids or [f"pool.jsonl:{i + 1}" for i in range(len(x))], x)
    return writer.close()


def _reference(train: list[np.ndarray], targets: list[np.ndarray], lr: list[float], groups: list[str]) -> np.ndarray:
    """Xia et al.'s formula, loop by loop in float64: max over groups of the mean over the group's
    targets of sum over checkpoints of lr * cosine."""
    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)

    scores = []
    for i in range(len(train[0])):
        per_group = {}
        for j, g in enumerate(groups):
            s = sum(w * cos(tr[i].astype(np.float64), tg[j].astype(np.float64))
                    for tr, tg, w in zip(train, targets, lr))
            per_group.setdefault(g, []).append(s)
        scores.append(max(np.mean(v) for v in per_group.values()))
    return np.array(scores)


def _data(n=37, m=7, checkpoints=3, seed=0):
    rng = np.random.default_rng(seed)
    # Unnormalised, with a shared direction so scores spread out, and one all-zero example.
    base = rng.standard_normal(DIM)
    train = [(rng.standard_normal((n, DIM)) + 0.5 * base) * rng.uniform(0.1, 10, (n, 1)) for _ in range(checkpoints)]
    for t in train:
        t[4] = 0.0
    targets = [rng.standard_normal((m, DIM)) + base for _ in range(checkpoints)]
    return [t.astype(np.float32) for t in train], [t.astype(np.float32) for t in targets]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_scores_match_the_dense_reference(tmp_path, dtype):
    train, targets = _data()
    lr = [2e-5, 1e-5, 5e-6]
    groups = ["arith", "logic", "arith", "qa", "logic", "arith", "arith"]  # unequal group sizes
    # Other shard sizes per checkpoint: chunks must still line up row by row.
    tr = [_store(tmp_path / f"tr{c}", x, checkpoint=f"e{c}", dtype=dtype, shard_rows=4 + c)
          for c, x in enumerate(train)]
    tg = [_store(tmp_path / f"tg{c}", x, ids=[f"t{j}" for j in range(7)], checkpoint=f"e{c}", grad_type="sgd")
          for c, x in enumerate(targets)]
    got = less_scores(tr, tg, lr, groups, chunk_rows=6)
    stored = [x.astype(dtype) for x in train]  # the reference sees what the store holds
    want = _reference(stored, targets, lr, groups)
    assert got.shape == (37,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[4] == 0.0  # an all-zero feature scores 0, not NaN
    # Scaling the lr weights scales the scores; one group gives the plain mean over targets.
    np.testing.assert_allclose(less_scores(tr, tg, [3 * w for w in lr], groups), 3 * got, rtol=1e-6)
    np.testing.assert_allclose(less_scores(tr, tg, lr), _reference(stored, targets, lr, ["g"] * 7), rtol=1e-5,
                               atol=1e-12)


def test_scoring_streams_chunks(tmp_path, monkeypatch):
    train, targets = _data(n=50, checkpoints=1)
    tr = _store(tmp_path / "tr", train[0])
    tg = _store(tmp_path / "tg", targets[0], ids=[f"t{j}" for j in range(7)])
    reads = []
    real = Datastore.read

    def spy(self, start, stop):
        reads.append((self.path.name, start, stop))
        return real(self, start, stop)

    monkeypatch.setattr(Datastore, "read", spy)
    less_scores([tr], [tg], [1.0], chunk_rows=8)
    train_reads = [(a, b) for name, a, b in reads if name == "tr"]
    assert train_reads == [(s, s + 8) for s in range(0, 50, 8)]  # never more than a chunk at once


def _pair(tmp_path, name, **kw):
    train, targets = _data(n=5, m=2, checkpoints=1)
    tr_kw = {k: v for k, v in kw.items() if k != "target"}
    tg_kw = {**tr_kw, **kw.get("target", {})}
    tr = _store(tmp_path / f"{name}-tr", train[0], **tr_kw)
    tg = _store(tmp_path / f"{name}-tg", targets[0], ids=["t0", "t1"], grad_type="sgd", **tg_kw)
    return tr, tg


def test_mismatched_stores_are_refused(tmp_path):
    tr, tg = _pair(tmp_path, "ok")
    bad_seed = _pair(tmp_path, "seed", target={"projection": ProjectionSpec(dim_in=1000, dim_out=DIM, seed=1)})[1]
    with pytest.raises(FtlabError, match=r"seed-tg has projection=\{.*'seed': 1.*\} but .*ok-tr has .*'seed': 0"):
        less_scores([tr], [bad_seed], [1.0])
    bad_model = _pair(tmp_path, "model", target={"model": "other"})[1]
    with pytest.raises(FtlabError, match="has model=other but .* has tiny; compute all features with the same model"):
        less_scores([tr], [bad_model], [1.0])
    bad_ckpt = _pair(tmp_path, "ckpt", target={"checkpoint": "epoch-2"})[1]
    with pytest.raises(FtlabError, match="checkpoint 0: train store .* is from 'epoch-1' but target store .* from "
                                         "'epoch-2'"):
        less_scores([tr], [bad_ckpt], [1.0])
    rng = np.random.default_rng(0)
    wide = _store(tmp_path / "wide", rng.standard_normal((2, 32)).astype(np.float32), ids=["t0", "t1"],
                  projection=ProjectionSpec(dim_in=1000, dim_out=32, seed=0))
    with pytest.raises(FtlabError, match="has dim=32 but .* has 16"):
        less_scores([tr], [wide], [1.0])
    with pytest.raises(FtlabError, match="one lr weight per checkpoint; got 1 train, 1 target stores and 2 weights"):
        less_scores([tr], [tg], [1.0, 2.0])
    with pytest.raises(FtlabError, match="target_groups has 3 labels for 2 target examples"):
        less_scores([tr], [tg], [1.0], ["a", "b", "c"])
    with pytest.raises(FtlabError, match="lr weights must be finite"):
        less_scores([tr], [tg], [float("nan")])
    tr2, tg2 = _pair(tmp_path, "e2", checkpoint="epoch-2")
    other_ids = _store(tmp_path / "ids", _data(n=5, checkpoints=1)[0][0], ids=[f"x:{i}" for i in range(5)],
                       checkpoint="epoch-2")
    with pytest.raises(FtlabError, match="lists other example ids"):
        less_scores([tr, other_ids], [tg, tg2], [1.0, 1.0])
    assert less_scores([tr, tr2], [tg, tg2], [1.0, 1.0]).shape == (5,)


def test_empty_targets_are_refused(tmp_path):
    tr, _ = _pair(tmp_path, "a")
    empty = DatastoreWriter(tmp_path / "empty", model="tiny", checkpoint="epoch-1", grad_type="sgd", dim=DIM,
                            projection=SPEC).close()
    with pytest.raises(FtlabError, match="target datastore .*empty is empty; give at least one target example"):
        less_scores([tr], [empty], [1.0])
    with pytest.raises(FtlabError, match="got 0 train, 0 target stores"):
        less_scores([], [], [])


def test_select_top_breaks_ties_by_row():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5])
    ids = [f"f:{i}" for i in range(6)]
    assert select_top(scores, ids, k=4) == [1, 4, 0, 2]
    assert select_top(scores, ids, k=6) == [1, 4, 0, 2, 5, 3]
    assert select_top(scores, ids, k=0) == []
    assert select_top(np.arange(100.0), [str(i) for i in range(100)], fraction=0.07) == list(range(99, 92, -1))
    assert select_top(scores, ids, fraction=0.5) == [1, 4, 0]
    assert len(select_top(np.zeros(101), ["x"] * 101, fraction=0.05)) == 6  # ceil(5.05)


def test_select_top_bad_input():
    scores, ids = np.array([0.1, np.nan, 0.3]), ["a", "b", "c"]
    with pytest.raises(FtlabError, match="1 scores are NaN .e.g. row 1."):
        select_top(scores, ids, k=1)
    with pytest.raises(FtlabError, match="not both or neither"):
        select_top(np.zeros(3), ids)
    with pytest.raises(FtlabError, match="not both or neither"):
        select_top(np.zeros(3), ids, k=1, fraction=0.5)
    with pytest.raises(FtlabError, match=r"fraction must be in \(0, 1\]"):
        select_top(np.zeros(3), ids, fraction=1.5)
    with pytest.raises(FtlabError, match=r"k=4 is outside \[0, 3\]"):
        select_top(np.zeros(3), ids, k=4)
    with pytest.raises(FtlabError, match="3 scores for 2 ids"):
        select_top(np.zeros(3), ids[:2], k=1)


def test_ids_round_trip_to_source_and_line():
    for source, line in [("pool/a.jsonl", 1), ("C:/data/b.jsonl", 12345), ("x:y.jsonl", 0)]:
        assert split_id(make_id(source, line)) == (source, line)
    assert split_id("no-line") == ("no-line", None)
    assert split_id("file.jsonl:abc") == ("file.jsonl:abc", None)


def test_write_selection_files(tmp_path):
    ids = ["pool/a.jsonl:1", "pool/a.jsonl:2", "pool/b.jsonl:1", "custom-id"]
    scores = np.array([0.25, -0.5, 0.75, 0.25])
    selected = select_top(scores, ids, k=3)
    write_selection(tmp_path / "sel.jsonl", tmp_path / "all.csv", ids, scores, selected)
    records = [json.loads(line) for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert records == [
        {"id": "pool/b.jsonl:1", "source": "pool/b.jsonl", "line": 1, "score": 0.75, "rank": 1},
        {"id": "pool/a.jsonl:1", "source": "pool/a.jsonl", "line": 1, "score": 0.25, "rank": 2},
        {"id": "custom-id", "source": "custom-id", "line": None, "score": 0.25, "rank": 3},
    ]
    with open(tmp_path / "all.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids
    assert [float(r["score"]) for r in rows] == scores.tolist()
    assert [r["rank"] for r in rows] == ["2", "", "1", "3"]
    assert [r["line"] for r in rows] == ["1", "2", "1", ""]
    # Sources given explicitly (e.g. from a sidecar) override what the ids say.
    write_selection(tmp_path / "s2.jsonl", tmp_path / "a2.csv", ids, scores, [3], sources=["s"] * 4, lines=[9] * 4)
    assert json.loads((tmp_path / "s2.jsonl").read_text())["source"] == "s"
    with pytest.raises(FtlabError, match="one score, source and line per id"):
        write_selection(tmp_path / "x.jsonl", tmp_path / "x.csv", ids, scores[:3], [0])


def _curvature_reference(train, targets, lr, groups, damping):
    """Inverse-curvature LESS loop by loop in float64: each checkpoint's group query (the
    lr-weighted mean of its unit targets) solved against F + damping * mean(diag F) * I, F the
    mean outer product of the unit training rows (an all-zero row adds nothing), then the
    max over groups of the sum over checkpoints of <unit train row, preconditioned query>."""
    def unit(v):
        v = v.astype(np.float64)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    names = list(dict.fromkeys(groups))
    total = np.zeros((len(train[0]), len(names)))
    for tr, tg, w in zip(train, targets, lr):
        f = sum(np.outer(unit(r), unit(r)) for r in tr) / len(tr)
        f = f + damping * np.trace(f) / f.shape[0] * np.eye(f.shape[0])
        for k, g in enumerate(names):
            q = w * np.mean([unit(tg[j]) for j, h in enumerate(groups) if h == g], axis=0)
            q = np.linalg.inv(f) @ q
            total[:, k] += [unit(r) @ q for r in tr]
    return total.max(axis=1)


def test_curvature_damped_scores_match_the_reference_and_tend_to_less(tmp_path):
    """curvature_damping preconditions the queries by the inverse damped second moment of the
    training features (TRAK-style): equal to a dense float64 reference (streamed in chunks of
    6 rows over shards of 4-6), and as the damping grows the ranking tends to plain LESS's."""
    train, targets = _data()
    lr = [2e-5, 1e-5, 5e-6]
    groups = ["arith", "logic", "arith", "qa", "logic", "arith", "arith"]
    tr = [_store(tmp_path / f"tr{c}", x, checkpoint=f"e{c}", shard_rows=4 + c) for c, x in enumerate(train)]
    tg = [_store(tmp_path / f"tg{c}", x, ids=[f"t{j}" for j in range(7)], checkpoint=f"e{c}", grad_type="sgd")
          for c, x in enumerate(targets)]
    got = less_scores(tr, tg, lr, groups, chunk_rows=6, curvature_damping=0.1)
    np.testing.assert_allclose(got, _curvature_reference(train, targets, lr, groups, 0.1), rtol=1e-5, atol=1e-12)
    plain = less_scores(tr, tg, lr, groups)
    assert not np.array_equal(np.argsort(got), np.argsort(plain))  # the preconditioning changes the ranking
    # lambda -> infinity: (F + lambda m I)^-1 ~ I / (lambda m): the plain scores, scaled.
    far = less_scores(tr, tg, lr, groups, curvature_damping=1e8)
    np.testing.assert_array_equal(np.argsort(-far, kind="stable"), np.argsort(-plain, kind="stable"))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(FtlabError, match="curvature_damping must be a finite number > 0"):
            less_scores(tr, tg, lr, groups, curvature_damping=bad)


def test_curvature_damping_is_a_select_setting(tmp_path):
    """``ftlab select`` (pipeline and score) scores through less_from_stores with the config's damping."""
    from ftlab.config import ConfigError
    from ftlab.select.data import InstructionExample
    from ftlab.select.pipeline import FeatureStores, SelectConfig, less_from_stores

    assert SelectConfig().curvature_damping is None  # LESS as published by default
    with pytest.raises(ConfigError, match="curvature_damping"):
        SelectConfig(curvature_damping=0.0)
    train, targets = _data(checkpoints=1)
    tr = FeatureStores([_store(tmp_path / "tr", train[0])], [1e-5], [])
    ids = [f"t.jsonl:{j + 1}" for j in range(7)]
    tg = FeatureStores([_store(tmp_path / "tg", targets[0], ids=ids, grad_type="sgd")], [1e-5], [])
    examples = [InstructionExample(id=i, messages=({"role": "user", "content": "q"},), response="a", task="t",
                                   family="t")
                for i in ids]
    for damping in (None, 0.1):
        _, got = less_from_stores(SelectConfig(curvature_damping=damping), tr, tg, examples, progress=False)
        np.testing.assert_array_equal(got, less_scores(tr.stores, tg.stores, [1e-5], curvature_damping=damping))
    assert not np.array_equal(less_from_stores(SelectConfig(), tr, tg, examples, progress=False)[1], got)
