"""The LESS pool from the evals wheel: a fake wheel for the rules (held-out families, licence
exclusion, caps, determinism, ownership of files), the real wheel for the licence parser."""

from __future__ import annotations

import json
import zipfile

import pytest

from ftlab.errors import FtlabError
from ftlab.io import file_sha256
from ftlab.select.data import load_instructions
from ftlab.select.pool import (
    DEFAULT_TARGET_FAMILIES,
    PoolSpec,
    build_evals_pool,
    evals_family,
    evals_row,
    licence_restricted,
)
from ftlab.tasks.sources import Source

_LICENCE = """MIT License

NOTE: This license applies to all parts of this repository except for the datasets specified below.

### Dataset Licenses

#### Secret
- **Location**: evals/registry/data/secret
- **Components**:
    - **thing**: CC BY-NC 4.0

#### Deep secret
- **Location**: evals/registry/data/deep_secret/
"""


def _chat(system: str, user: str, ideal) -> dict:
    return {"input": [{"role": "system", "content": system}, {"role": "user", "content": user}], "ideal": ideal}


def _story_rows() -> list:
    good = [_chat("Continue the story.", f"Once upon a time {i}", f"good {i}") for i in range(6)]
    bad = [
        {"input": "no answer here"},  # no_ideal
        _chat("Continue the story.", "empty answer", "  "),  # no_ideal
        {"input": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "ideal": "x"},  # multimodal
        {"input": [{"role": "system", "content": "only a system prompt"}], "ideal": "x"},  # no_user
        {"input": [{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}], "ideal": "x"},  # roles
        _chat("Continue the story.", "x" * 300, "too long"),  # too_long
        _chat("Continue the story.", "Once upon a time 0", "good 0"),  # duplicate
    ]
    return good + bad


def fake_evals(folder, monkeypatch, licence: str | None = _LICENCE, version: str = "0.0.1", extra=None) -> Source:
    """A small evals-like wheel in ``folder``, found through $FTLAB_ARCHIVES (cache in ``folder/cache``)."""
    data = {
        "spanish-lexicon/samples.jsonl": [_chat("A Spanish word? Y or N.", f"palabra{i}", "Y") for i in range(10)],
        "french_lexicon/samples.jsonl": [_chat("Is it a French word? Y or N.", "mot", "N")],
        # a pool task holding the French target's prompt: dropped from the pool
        "vocab/samples.jsonl": [_chat("Is it a French word? Y or N.", "mot", "Y"), _chat("Words.", "a", "a"),
                                _chat("Words.", "b", "b")],
        "math_v2/a.jsonl": [{"input": f"What is {i}+{i}?", "ideal": [str(2 * i), "other"]} for i in range(6)],
        "math_v2/b.jsonl": [{"input": f"What is {i}+{i}?", "ideal": [str(2 * i)]} for i in range(6, 12)],
        "story/samples.jsonl": _story_rows(),
        "secret/samples.jsonl": [_chat("Secret.", f"secret {i}", "s") for i in range(5)],
        "deep_secret/x/deep.jsonl": [_chat("Secret.", f"deep {i}", "s") for i in range(5)],
        "builtin/samples.jsonl": [_chat("Built in.", f"builtin {i}", "b") for i in range(5)],
        "lfs/samples.jsonl": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n",
        **(extra or {}),
    }
    wheel = folder / f"evals-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        if licence is not None:
            zf.writestr(f"evals-{version}.dist-info/LICENSE.md", licence)
        zf.writestr("evals/registry/evals/story.yaml", "story: {}\n")
        for rel, rows in data.items():
            body = rows if isinstance(rows, bytes) else "".join(
                (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
            zf.writestr(f"evals/registry/data/{rel}", body)
    monkeypatch.setenv("FTLAB_ARCHIVES", str(folder))
    monkeypatch.setenv("FTLAB_CACHE", str(folder / "cache"))
    return Source("evals", version, wheel.name, file_sha256(wheel), wheel.stat().st_size, licence="test")


def _spec(**kw) -> PoolSpec:
    return PoolSpec(**{"per_task": 4, "n_target": 2, "max_chars": 200, "target_families": ["lexicon"],
                       "exclude_tasks": ["builtin"], "scan": 50, **kw})


def _texts(examples) -> set:
    return {json.dumps([*ex.messages, ex.response]) for ex in examples}


def test_evals_family():
    cases = {"spanish-exams-qa": "exams-qa", "belarusian_lexicon": "lexicon", "dutch-rhymes": "rhyme",
             "finnish-rhyme": "rhyme", "japanese-national-medical-exam02": "japanese-national-medical-exam",
             "icelandic-inflection-hard": "icelandic-inflection", "math_v2": "math", "sarcasm": "sarcasm",
             "Chinese_character_riddles": "chinese-character-riddles", "banking77": "banking77", "rot13": "rot13"}
    assert {task: evals_family(task) for task in cases} == cases


def test_licence_parser():
    assert licence_restricted(_LICENCE) == ["secret", "deep_secret"]
    assert licence_restricted("MIT License, no datasets listed") == []
    with pytest.raises(FtlabError, match="LICENSE.md:3: cannot read the dataset location"):
        licence_restricted("x\n\n- **Location**: somewhere/else\n")


@pytest.mark.parametrize("row, expected", [
    ({"input": "What is 2+2?", "ideal": ["4", "four"]}, ([{"role": "user", "content": "What is 2+2?"}], "4")),
    ({"input": [{"role": "system", "content": "Add."},
                {"role": "system", "name": "example_user", "content": "1+1"},
                {"role": "system", "name": "example_assistant", "content": "2"},
                {"role": "user", "content": "2+2"}, {"role": "system", "content": "Digits only."}], "ideal": " 4 "},
     ([{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
       {"role": "user", "content": "2+2\nDigits only."}], "4")),
    ({"input": "q", "ideal": ""}, "no_ideal"),
    ({"input": "q", "ideal": []}, "no_ideal"),
    ({"input": "q", "ideal": 3}, "no_ideal"),
    ({"input": [{"role": "user", "content": [{"type": "text", "text": "q"}]}], "ideal": "a"}, "multimodal"),
    ({"input": [{"role": "system", "content": "the whole question"}], "ideal": "a"}, "no_user"),
    ({"input": [{"role": "user", "content": "   "}], "ideal": "a"}, "no_user"),
    ({"input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ideal": "a"}, "roles"),
    ({"input": [{"role": "function", "content": "q"}, {"role": "user", "content": "q"}], "ideal": "a"}, "roles"),
    (["not", "a", "row"], "not_object"),
])
def test_evals_row(row, expected):
    assert evals_row(row) == expected


def test_pool_from_fake_wheel(tmp_path, monkeypatch):
    """Held-out target families, licence exclusion, skipped rows, caps, origins, determinism."""
    source = fake_evals(tmp_path / "wheel", monkeypatch)
    built = build_evals_pool(tmp_path / "out", _spec(), source=source)
    assert not built.reused and sorted(built.targets) == ["lexicon"]
    pool, target = load_instructions([built.pool]), load_instructions([built.targets["lexicon"]])
    tasks = lambda exs: {t: sum(ex.task == t for ex in exs) for t in sorted({ex.task for ex in exs})}  # noqa: E731
    assert tasks(pool) == {"math_v2": 4, "story": 4, "vocab": 2}  # per_task; secret, builtin, lfs... give none
    assert tasks(target) == {"french_lexicon": 1, "spanish-lexicon": 2}  # n_target (french has one row)
    assert {ex.family for ex in pool} == {"math", "story", "vocab"} and {ex.family for ex in target} == {"lexicon"}
    assert not _texts(pool) & _texts(target)
    assert not {json.dumps(ex.messages) for ex in pool} & {json.dumps(ex.messages) for ex in target}
    assert all(ex.response.startswith("good ") for ex in pool if ex.task == "story")  # only the usable rows
    assert all(sum(len(m["content"]) for m in ex.messages) + len(ex.response) <= 200 for ex in pool)
    counts = built.manifest["counts"]
    assert counts["licence_excluded"] == ["deep_secret", "secret"] and counts["spec_excluded"] == ["builtin"]
    assert counts["pool"] == 10 and counts["targets"] == {"lexicon": 3} and counts["tasks_kept"] == 5
    assert counts["pool_dropped_as_target_prompt"] == 1
    assert counts["tasks_without_usable_rows"] == ["lfs"]
    story = built.manifest["tasks"]["story"]
    assert {k: v for k, v in story.items() if k not in ("family", "set")} == {
        "lines": 13, "no_ideal": 2, "multimodal": 1, "no_user": 1, "roles": 1, "too_long": 1, "duplicate": 1,
        "usable": 6, "rows": 4}
    assert built.manifest["tasks"]["lfs"]["lfs_pointer_files"] == 1
    assert set(built.manifest["tasks"]) == {"math_v2", "story", "vocab", "spanish-lexicon", "french_lexicon", "lfs"}
    # Each row names the line it came from; a list ideal gives its first answer.
    rows = [json.loads(line) for line in built.pool.read_text().splitlines()]
    with zipfile.ZipFile(tmp_path / "wheel" / source.filename) as zf:
        for row in rows:
            member, _, line = row["origin"].rpartition(":")
            raw = json.loads(zf.read(f"evals/registry/data/{member}").decode().splitlines()[int(line) - 1])
            assert evals_row(raw) == (row["messages"][:-1], row["messages"][-1]["content"])
    assert {r["messages"][-1]["content"] for r in rows if r["task"] == "math_v2"} <= {str(2 * i) for i in range(12)}
    assert not (tmp_path / "wheel" / "cache" / "sources" / "evals-0.0.1" / "evals").exists()  # nothing extracted
    # Seeded: the same spec gives the same bytes; another seed another draw.
    again = build_evals_pool(tmp_path / "again", _spec(), source=source)
    assert again.pool.read_bytes() == built.pool.read_bytes()
    assert again.targets["lexicon"].read_bytes() == built.targets["lexicon"].read_bytes()
    assert build_evals_pool(tmp_path / "seed1", _spec(seed=1), source=source).pool.read_bytes() != \
        built.pool.read_bytes()
    # Each task draws with its own seed: leaving one task out changes no other task's rows.
    fewer = build_evals_pool(tmp_path / "fewer", _spec(exclude_tasks=["builtin", "math_v2"]), source=source)
    assert [r for r in rows if r["task"] != "math_v2"] == \
        [json.loads(line) for line in fewer.pool.read_text().splitlines()]


def test_scan_samples_the_whole_task_uniformly(tmp_path, monkeypatch):
    rows = [_chat("Count.", f"number {i}", str(i)) for i in range(300)]
    source = fake_evals(tmp_path / "wheel", monkeypatch, extra={"count/samples.jsonl": rows})
    built = build_evals_pool(tmp_path / "out", _spec(per_task=20, scan=20), source=source)
    count = built.manifest["tasks"]["count"]
    assert (count["lines"], count["usable"], count["rows"]) == (300, 20, 20)  # 20 of 300 parsed
    lines = [int(json.loads(r)["origin"].rpartition(":")[2]) for r in built.pool.read_text().splitlines()
             if json.loads(r)["task"] == "count"]
    assert max(lines) > 100  # a sample of the whole file, not its head
    with pytest.raises(FtlabError, match="scan .* must be at least per_task"):
        build_evals_pool(tmp_path / "bad", _spec(per_task=30, scan=20), source=source)


def test_pool_refuses_and_replaces_only_its_own_files(tmp_path, monkeypatch):
    source = fake_evals(tmp_path / "wheel", monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pool.jsonl").write_text("mine\n")
    with pytest.raises(FtlabError, match="pool.jsonl exists and was not written by"):
        build_evals_pool(out, _spec(), source=source)
    assert (out / "pool.jsonl").read_text() == "mine\n" and not (out / "manifest.json").exists()
    (out / "pool.jsonl").unlink()
    (out / "notes.txt").write_text("keep me")
    built = build_evals_pool(out, _spec(), source=source)
    # Another target family: the old target file (ftlab's) goes, the user's file stays.
    story = build_evals_pool(out, _spec(target_families=["story"]), source=source)
    assert sorted(story.targets) == ["story"] and not (out / "targets" / "lexicon.jsonl").exists()
    assert (out / "notes.txt").read_text() == "keep me" and "lexicon" not in story.manifest["files"]
    # The same spec again: the files are kept, without the wheel.
    for path in (tmp_path / "wheel" / source.filename, tmp_path / "wheel" / "cache" / "downloads" / source.filename):
        path.unlink()
    assert build_evals_pool(out, _spec(target_families=["story"]), source=source).reused
    # A file ftlab wrote but someone changed is not overwritten.
    (out / "targets" / "story.jsonl").write_text("edited\n")
    with pytest.raises(FtlabError, match="story.jsonl was changed since ftlab wrote it"):
        build_evals_pool(out, _spec(), source=source)
    assert (out / "targets" / "story.jsonl").read_text() == "edited\n" and built.pool.exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"files": {}}')
    with pytest.raises(FtlabError, match="manifest.json exists and was not written by"):
        build_evals_pool(tmp_path / "foreign", _spec(), source=source)


def test_a_killed_build_is_finished_by_the_next(tmp_path, monkeypatch):
    """Files written before a crash are listed as ftlab's (pending) first, so the rerun replaces them."""
    import ftlab.select.pool as data

    source = fake_evals(tmp_path / "wheel", monkeypatch)
    real = data.atomic_file

    def crash_on_targets(path, *args, **kw):
        if "targets" in str(path):
            raise KeyboardInterrupt
        return real(path, *args, **kw)

    monkeypatch.setattr(data, "atomic_file", crash_on_targets)
    with pytest.raises(KeyboardInterrupt):
        build_evals_pool(tmp_path / "out", _spec(), source=source)
    assert (tmp_path / "out" / "pool.jsonl").exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["pending"]
    monkeypatch.setattr(data, "atomic_file", real)
    built = build_evals_pool(tmp_path / "out", _spec(), source=source)
    assert not built.reused and "pending" not in built.manifest and built.targets["lexicon"].exists()


@pytest.mark.parametrize("families, message", [
    (["lexicn"], "unknown target family 'lexicn' .*did you mean lexicon"),
    (["secret"], "excluded by the evals wheel's LICENSE.md"),
    (["builtin"], "left out by exclude_tasks"),
    (["lfs"], "target family 'lfs' has no usable rows"),
])
def test_bad_target_families(tmp_path, monkeypatch, families, message):
    source = fake_evals(tmp_path / "wheel", monkeypatch)
    with pytest.raises(FtlabError, match=message):
        build_evals_pool(tmp_path / "out", _spec(target_families=families), source=source)
    assert not (tmp_path / "out").exists()


def test_a_wheel_without_its_licence_is_refused(tmp_path, monkeypatch):
    source = fake_evals(tmp_path / "wheel", monkeypatch, licence=None)
    with pytest.raises(FtlabError, match="has no evals-0.0.1.dist-info/LICENSE.md"):
        build_evals_pool(tmp_path / "out", _spec(), source=source)


@pytest.mark.slow
def test_real_evals_wheel(tmp_path):
    """The pinned wheel (fetched on first use): its LICENSE.md's exclusions and a pool with rows."""
    from ftlab.tasks.sources import EVALS, artefact

    with zipfile.ZipFile(artefact(EVALS)) as zf:
        text = zf.read(f"evals-{EVALS.version}.dist-info/LICENSE.md").decode("utf-8")
    restricted = ["text_compression", "steganography", "schelling_point", "ballots", "sandbagging",
                  "theory_of_mind", "already_said_that"]
    assert licence_restricted(text) == restricted
    built = build_evals_pool(tmp_path / "pool", PoolSpec(per_task=2, n_target=2, max_chars=600, scan=100))
    counts = built.manifest["counts"]
    assert counts["licence_excluded"] == sorted(restricted) and counts["spec_excluded"] == ["corr2cause"]
    assert counts["tasks_kept"] > 300 and counts["pool"] > 500 and counts["pool_families"] > 250
    assert sorted(built.targets) == sorted(DEFAULT_TARGET_FAMILIES)
    assert counts["targets"]["exams-qa"] == 32 and counts["targets"]["lexicon"] == 26  # 16 and 13 languages x 2
    pool = load_instructions([built.pool])
    assert len(pool) == counts["pool"]
    assert not {ex.task for ex in pool} & {*restricted, "corr2cause"}
    assert not {ex.family for ex in pool} & set(DEFAULT_TARGET_FAMILIES)
