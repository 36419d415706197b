"""The real LESS pool and held-out target sets, built from the registry data of the pinned
``evals`` wheel (OpenAI evals; :data:`ftlab.tasks.sources.EVALS`), read streaming from the
verified artefact, never extracted whole. See :func:`build_evals_pool`.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from ftlab.errors import FtlabError
from ftlab.io import atomic_file, atomic_write_json

#: The folder of the wheel that holds one sub-folder of JSONL samples per registry task.
EVALS_DATA = "evals/registry/data/"
#: The file ``build_evals_pool`` writes beside the pool: the spec, the source, every file it
#: wrote (sha256, rows) and per-task counts. What it lists is ftlab's to replace; nothing else is.
POOL_MANIFEST = "manifest.json"
#: Families held out as LESS targets by default (never in the pool). Each is one task asked in
#: several languages, so holding out the whole family leaves no sibling of a target in the pool,
#: and each has enough short rows at ``max_chars=400`` for 4 targets per task:
#: ``exams-qa`` (16 folders: school-exam multiple choice, answer ``[A]``..), ``lexicon`` (13: does
#: this word exist in language X? ``Y``/``N``), ``sarcasm`` (3: English, Portuguese, Russian).
DEFAULT_TARGET_FAMILIES = ("exams-qa", "lexicon", "sarcasm")
# Name endings that mark one task repeated over languages or variants: ``<ending>`` is the family.
_SERIES = {"exams-qa": "exams-qa", "lexicon": "lexicon", "sarcasm": "sarcasm", "rhyme": "rhyme", "rhymes": "rhyme",
           "syllable-count": "syllable-count", "numerals": "numerals", "kinship-riddles": "kinship-riddles",
           "proverbs": "proverbs", "to-hex": "to-hex", "word-problems": "word-problems"}
# A trailing version / number / difficulty (``-v2``, ``_3``, ``exam01``, ``-hard``).
_VARIANT = re.compile(r"(?:[-.](?:v?\d+|easy|medium|hard)|(?<=[a-z])0\d+)$")
_LOCATION = re.compile(r"^\s*[-*]\s*\*\*Location\*\*:\s*(\S+?)/?\s*$")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_POOL_FORMAT = "ftlab-evals-pool"
_POOL_VERSION = 1  # of the rules turning the wheel into rows; an earlier build is reused only at the same one
_FAMILY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TARGET_FILE = re.compile(r"targets/[A-Za-z0-9][A-Za-z0-9._-]*\.jsonl")


def _default_excluded() -> list[str]:
    from ftlab.tasks.registry import default_sources
    from ftlab.tasks.sources import EVALS

    return sorted({m[len(EVALS_DATA):].split("/")[0] for source, members in default_sources()
                   if source.package == EVALS.package for m in members if m.startswith(EVALS_DATA)})


@dataclass
class PoolSpec:
    """How the instruction pool and the held-out target sets are drawn from the evals registry.

    Attributes:
        per_task: pool examples drawn from each task (registry folder) of the pool families
            (fewer if it has fewer usable rows).
        n_target: target examples drawn from each task of a target family.
        max_chars: skip rows whose messages + response are longer (keeps sequences short).
        target_families: the families used only as targets: none of their tasks is in the pool,
            and only they get ``targets/<family>.jsonl``. See :func:`evals_family`.
        exclude_tasks: registry folders left out entirely (default: those ftlab's built-in
            evaluation tasks read, e.g. ``corr2cause``, so the pool never trains on them).
        scan: rows of a task parsed at most: a uniform sample of all its lines (reservoir
            sampling while streaming its files), from which the usable rows are drawn.
        seed: seed of the draws (each task draws with its own seed derived from it and its name).
    """

    per_task: int = 40
    n_target: int = 4
    max_chars: int = 1000
    target_families: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_FAMILIES))
    exclude_tasks: list[str] = field(default_factory=_default_excluded)
    scan: int = 1000
    seed: int = 0

    def check(self) -> None:
        """Raise one line for a value out of range."""
        for name in ("per_task", "n_target", "max_chars", "scan"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FtlabError(f"pool spec: {name} must be a positive integer, got {getattr(self, name)!r}")
        bad = [f for f in self.target_families if not (isinstance(f, str) and _FAMILY_NAME.fullmatch(f))]
        if bad:
            raise FtlabError(f"pool spec: {bad[0]!r} is not a family name (letters, digits, '.', '_', '-')")
        if self.scan < max(self.per_task, self.n_target):
            raise FtlabError(f"pool spec: scan ({self.scan}) must be at least per_task ({self.per_task}) "
                             f"and n_target ({self.n_target})")


@dataclass(frozen=True)
class BuiltPool:
    """What :func:`build_evals_pool` wrote (or found already written for the same spec).

    Attributes:
        pool: ``<out>/pool.jsonl``.
        targets: ``{family: <out>/targets/<family>.jsonl}``.
        manifest: the content of ``<out>/manifest.json`` (spec, source, files, per-task counts).
        reused: True when the files of an identical earlier build were kept as they were.
        seconds: time taken.
    """

    pool: Path
    targets: dict[str, Path]
    manifest: dict[str, Any]
    reused: bool
    seconds: float


def evals_family(task: str) -> str:
    """The family of an evals registry folder: its name in lower case with ``-`` for ``_``, a
    trailing version, number or difficulty dropped (``japanese-national-medical-exam01`` and
    ``...exam02`` -> ``japanese-national-medical-exam``, ``icelandic-inflection-hard`` ->
    ``icelandic-inflection``), and a series of one task over languages named by its shared
    ending (``spanish-exams-qa`` -> ``exams-qa``, ``dutch-rhymes`` -> ``rhyme``)."""
    name = task.lower().replace("_", "-")
    while (shorter := _VARIANT.sub("", name)) != name and shorter:
        name = shorter
    for ending, family in _SERIES.items():
        if name == ending or name.endswith("-" + ending):
            return family
    return name


def licence_restricted(text: str) -> list[str]:
    """The registry folders a LICENSE.md lists under its dataset licences (every
    ``**Location**: evals/registry/data/<folder>`` line), in file order.

    Raises:
        FtlabError: a ``**Location**`` line that is not of that form (so nothing is missed).
    """
    folders = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if "**Location**" not in line:
            continue
        m = _LOCATION.match(line)
        if not m or not m.group(1).startswith(EVALS_DATA) or len(m.group(1)) == len(EVALS_DATA):
            raise FtlabError(f"LICENSE.md:{line_no}: cannot read the dataset location in {line.strip()!r} "
                             f"(expected '- **Location**: {EVALS_DATA}<folder>')")
        folder = m.group(1)[len(EVALS_DATA):].split("/")[0]
        if folder not in folders:
            folders.append(folder)
    return folders


def evals_row(row: Any) -> tuple[list[dict[str, str]], str] | str:
    """``(messages, response)`` of one evals sample, or the reason it is not a usable
    instruction pair: ``"no_ideal"`` (missing, empty or not text), ``"multimodal"`` (content
    that is not a string), ``"roles"`` (an unknown role, or not ending with the user's turn),
    ``"no_user"`` (no user message with text, e.g. the whole prompt in a system message),
    ``"not_object"``.

    ``input`` is a string (the user's message) or chat messages. Few-shot turns written as
    ``{"role": "system", "name": "example_user"|"example_assistant"}`` become user / assistant
    turns; a system message after the first turn becomes a user turn; consecutive turns of one
    role are joined by newlines (so roles alternate, as strict chat templates require). A list
    ``ideal`` (several accepted answers) gives its first.
    """
    if not isinstance(row, dict):
        return "not_object"
    ideal = row.get("ideal")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal else None
    if not isinstance(ideal, str) or not ideal.strip():
        return "no_ideal"
    raw = row.get("input")
    raw = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not raw:
        return "no_user"
    messages: list[dict[str, str]] = []
    has_user = False
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return "roles"
        if not isinstance(m.get("content"), str):
            return "multimodal"
        role = {"example_user": "user", "example_assistant": "assistant"}.get(m.get("name"), m["role"])
        if role not in ("system", "user", "assistant"):
            return "roles"
        if role == "system" and messages and messages[-1]["role"] != "system":
            role = "user"
        has_user |= m["role"] == "user" and bool(m["content"].strip())
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n" + m["content"]}
        else:
            messages.append({"role": role, "content": m["content"]})
    if not has_user:
        return "no_user"
    first_turn = messages[1] if messages[0]["role"] == "system" else messages[0]
    if first_turn["role"] != "user" or messages[-1]["role"] != "user":
        return "roles"
    return messages, ideal.strip()


def _task_members(names: Sequence[str]) -> dict[str, list[str]]:
    """``{folder: [its .jsonl members, sorted]}`` of the registry data in an artefact."""
    tasks: dict[str, list[str]] = {}
    for name in sorted(names):
        rest = name[len(EVALS_DATA):]
        if name.startswith(EVALS_DATA) and name.endswith(".jsonl") and "/" in rest:
            tasks.setdefault(rest.split("/")[0], []).append(name)
    return tasks


def _split_lines(f: Any) -> Iterator[bytes]:
    """The lines of a binary stream, ended by ``\\n``, ``\\r\\n`` or a lone ``\\r`` (one registry file
    ends its lines with ``\\r`` only); JSON text holds no raw line breaks, so none is cut."""
    for chunk in f:
        if b"\r" in chunk:
            yield from chunk.splitlines()
        else:
            yield chunk


def _sample_lines(zf: Any, members: list[str], scan: int, rng: random.Random,
                  counts: dict[str, int]) -> list[tuple[str, int, bytes]]:
    """A uniform sample of at most ``scan`` non-blank lines over ``members`` (reservoir
    sampling, one pass, at most ``scan`` lines held), sorted back into file order."""
    sample: list[tuple[str, int, bytes]] = []
    seen = 0
    for member in members:
        with zf.open(member) as f:
            for line_no, line in enumerate(_split_lines(f), start=1):
                if line_no == 1 and line.startswith(_LFS_POINTER):
                    counts["lfs_pointer_files"] = counts.get("lfs_pointer_files", 0) + 1
                    break
                if not line.strip():
                    continue
                seen += 1
                if len(sample) < scan:
                    sample.append((member, line_no, line))
                elif (j := rng.randrange(seen)) < scan:
                    sample[j] = (member, line_no, line)
    counts["lines"] = seen
    return sorted(sample, key=lambda s: (s[0], s[1]))


def _usable_rows(task: str, sample: list[tuple[str, int, bytes]], max_chars: int,
                 counts: dict[str, int]) -> list[dict[str, Any]]:
    """The sampled lines that are usable instruction pairs, as pool rows (duplicates dropped)."""
    rows, seen = [], set()
    for member, line_no, line in sample:
        try:
            parsed = evals_row(json.loads(line))
        except ValueError:
            parsed = "bad_json"
        if isinstance(parsed, tuple) and sum(len(m["content"]) for m in parsed[0]) + len(parsed[1]) > max_chars:
            parsed = "too_long"
        if isinstance(parsed, tuple) and (key := json.dumps(parsed)) in seen:
            parsed = "duplicate"
        if isinstance(parsed, str):
            counts[parsed] = counts.get(parsed, 0) + 1
            continue
        seen.add(key)
        messages, response = parsed
        rows.append({"messages": [*messages, {"role": "assistant", "content": response}],
                     "origin": f"{member[len(EVALS_DATA):]}:{line_no}", "task": task})
    counts["usable"] = len(rows)
    return rows


def _prompt_key(row: dict[str, Any]) -> str:
    return json.dumps(row["messages"][:-1], ensure_ascii=False)


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of an earlier build in ``out_dir`` (None if there is none).

    Raises:
        FtlabError: a ``manifest.json`` there that this builder did not write.
    """
    path = out_dir / POOL_MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") == _POOL_FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise FtlabError(f"{path} exists and was not written by `ftlab select prepare-pool` (or is damaged); "
                         "choose another output folder — ftlab never overwrites files it did not write")
    return manifest


def _ours(out_dir: Path, manifest: dict[str, Any] | None) -> dict[str, str | None]:
    """``{relative path: sha256}`` of the files an earlier build wrote (None: being written)."""
    files = (manifest or {}).get("files", {})
    ours = {}
    for rel, entry in files.items():
        if rel == "pool.jsonl" or _TARGET_FILE.fullmatch(rel):
            ours[rel] = entry.get("sha256") if isinstance(entry, dict) else None
    return ours


def _check_replaceable(out_dir: Path, rel: str, ours: dict[str, str | None]) -> None:
    from ftlab.io import file_sha256

    path = out_dir / rel
    if not path.exists():
        return
    if rel not in ours:
        raise FtlabError(f"{path} exists and was not written by `ftlab select prepare-pool` (its "
                         f"{POOL_MANIFEST} does not list it); move it away or choose another output folder")
    if ours[rel] is not None and (not path.is_file() or file_sha256(path) != ours[rel]):
        raise FtlabError(f"{path} was changed since ftlab wrote it; move it away or choose another output folder")


def _reusable(out_dir: Path, manifest: dict[str, Any] | None, spec: PoolSpec, source: Any) -> bool:
    from ftlab.io import file_sha256

    if not manifest or manifest.get("pending") or manifest.get("version") != _POOL_VERSION \
            or manifest.get("spec") != json.loads(json.dumps(asdict(spec))) \
            or manifest.get("source", {}).get("sha256") != source.sha256:
        return False
    return all((out_dir / rel).is_file() and file_sha256(out_dir / rel) == entry.get("sha256")
               for rel, entry in manifest["files"].items())


def _built(out_dir: Path, manifest: dict[str, Any], reused: bool, start: float) -> BuiltPool:
    targets = {rel[len("targets/"):-len(".jsonl")]: out_dir / rel for rel in manifest["files"] if rel != "pool.jsonl"}
    return BuiltPool(out_dir / "pool.jsonl", dict(sorted(targets.items())), manifest, reused,
                     time.perf_counter() - start)


def _unknown_family(family: str, known: set[str], restricted: dict[str, str], excluded: set[str]) -> FtlabError:
    import difflib

    if family in restricted.values():
        return FtlabError(f"target family {family!r} is excluded by the evals wheel's LICENSE.md "
                          "(its data sets have their own licences); choose another")
    if family in excluded:
        return FtlabError(f"target family {family!r} is left out by exclude_tasks; choose another")
    close = difflib.get_close_matches(family, sorted(known), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(DEFAULT_TARGET_FAMILIES)}"
    return FtlabError(f"unknown target family {family!r} ({len(known)} families in the evals registry; {hint})")


def build_evals_pool(out_dir: str | Path, spec: PoolSpec | None = None, *, source: Any = None,
                     progress: bool = False) -> BuiltPool:
    """Write ``pool.jsonl``, ``targets/<family>.jsonl`` and ``manifest.json`` under ``out_dir``
    from the registry data of the pinned ``evals`` wheel (:data:`ftlab.tasks.sources.EVALS`).

    * Every folder of ``evals/registry/data/`` is a task; its family is :func:`evals_family`.
      Folders the wheel's ``LICENSE.md`` puts under other dataset licences
      (:func:`licence_restricted`) and ``spec.exclude_tasks`` are never opened.
    * Each task's JSONL files are streamed from the verified wheel (nothing is extracted); at most
      ``spec.scan`` of its lines are parsed, a uniform sample (reservoir sampling), and rows that
      are no usable instruction pair (:func:`evals_row`), longer than ``max_chars`` or repeated
      are skipped; git-LFS pointer files are skipped.
    * Tasks of ``spec.target_families`` give ``n_target`` rows each to their family's target
      file and nothing to the pool; every other task gives ``per_task`` rows to the pool. Draws
      are without replacement, seeded per task (so excluding one task changes no other draw);
      a pool row whose prompt equals a target's is dropped.
    * Rows are ``{"messages": [...], "origin": "<folder>/<file>:<line>", "task", "family"}``
      (:func:`load_instructions` reads them). Each file is written atomically; files an earlier
      build wrote (listed in ``manifest.json``) are replaced and stale ones removed, any other
      existing file is refused. An earlier build with the same spec and wheel is kept as it is
      (``reused``), without reading the wheel.

    Raises:
        FtlabError: a bad spec, an unknown or licence-excluded target family, a target family
            without usable rows, a foreign file in the way, or the wheel cannot be had
            (see :func:`ftlab.tasks.sources.artefact`).
    """
    import zipfile
    import zlib

    from ftlab.io import file_sha256
    from ftlab.tasks.sources import EVALS, artefact

    start = time.perf_counter()
    spec = spec or PoolSpec()
    spec.check()
    source = source or EVALS
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FtlabError(f"{out_dir} exists and is not a folder; choose another output folder")
    old = _read_manifest(out_dir)
    if _reusable(out_dir, old, spec, source):
        return _built(out_dir, old, True, start)

    ours = _ours(out_dir, old)  # before any work: refuse what is in the way
    names_out = ["pool.jsonl", *(f"targets/{f}.jsonl" for f in sorted(set(spec.target_families)))]
    stale = [rel for rel in ours if rel not in names_out]
    for rel in [*names_out, *stale]:
        _check_replaceable(out_dir, rel, ours)

    path = artefact(source, progress=progress)
    licence_member = f"{source.package}-{source.version}.dist-info/LICENSE.md"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if licence_member not in names:
                raise FtlabError(f"{path}: {source.requirement} has no {licence_member}; without it the "
                                 "datasets under other licences cannot be told apart, so no pool is built")
            restricted_list = licence_restricted(zf.read(licence_member).decode("utf-8"))
            tasks = _task_members(names)
            restricted = {t: evals_family(t) for t in restricted_list if t in tasks}
            excluded = {t: evals_family(t) for t in spec.exclude_tasks if t in tasks and t not in restricted}
            kept = {t: evals_family(t) for t in tasks if t not in restricted and t not in excluded}
            known = set(kept.values())
            for family in spec.target_families:
                if family not in known:
                    raise _unknown_family(family, known, restricted, set(excluded.values()) - known)
            targets_wanted = set(spec.target_families)
            pool, targets, per_task = [], {f: [] for f in spec.target_families}, {}
            for task in tqdm(sorted(kept), desc="reading the evals registry", disable=not progress):
                family = kept[task]
                rng = random.Random(f"{spec.seed}/{task}")
                counts: dict[str, int] = {}
                usable = _usable_rows(task, _sample_lines(zf, tasks[task], spec.scan, rng, counts),
                                      spec.max_chars, counts)
                is_target = family in targets_wanted
                drawn = rng.sample(usable, min(len(usable), spec.n_target if is_target else spec.per_task))
                for row in drawn:
                    row["family"] = family
                (targets[family] if is_target else pool).extend(drawn)
                per_task[task] = {"family": family, "set": "target" if is_target else "pool", **counts,
                                  "rows": len(drawn)}
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise FtlabError(f"{path}: {source.requirement}'s artefact is damaged ({e}); "
                         "delete it and run again") from e

    empty = [f for f, rows in targets.items() if not rows]
    if empty:
        raise FtlabError(f"target family {empty[0]!r} has no usable rows of at most {spec.max_chars} characters; "
                         "raise max_chars or choose another family")
    target_prompts = {_prompt_key(r) for rows in targets.values() for r in rows}
    n_pool = len(pool)
    pool = [r for r in pool if _prompt_key(r) not in target_prompts]

    files = {"pool.jsonl": pool, **{f"targets/{f}.jsonl": rows for f, rows in sorted(targets.items())}}
    manifest: dict[str, Any] = {
        "format": _POOL_FORMAT, "version": _POOL_VERSION, "pending": True,
        "source": {"requirement": source.requirement, "filename": source.filename, "sha256": source.sha256},
        "spec": asdict(spec),
        "files": {**{rel: {"sha256": sha} if sha else None for rel, sha in ours.items()}, **dict.fromkeys(files)}}
    atomic_write_json(out_dir / POOL_MANIFEST, manifest)  # first: a killed build's files stay ours
    for rel, rows in files.items():
        with atomic_file(out_dir / rel) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        manifest["files"][rel] = {"sha256": file_sha256(out_dir / rel), "rows": len(rows)}
    for rel in stale:
        (out_dir / rel).unlink(missing_ok=True)
        manifest["files"].pop(rel, None)
    manifest.pop("pending")
    manifest["counts"] = {
        "tasks_in_registry": len(tasks), "tasks_kept": sum(1 for c in per_task.values() if c["rows"]),
        "tasks_without_usable_rows": sorted(t for t, c in per_task.items() if not c["rows"]),
        "licence_excluded": sorted(restricted), "spec_excluded": sorted(excluded),
        "pool": len(pool), "pool_dropped_as_target_prompt": n_pool - len(pool),
        "targets": {f: len(rows) for f, rows in sorted(targets.items())},
        "pool_families": len({r["family"] for r in pool})}
    manifest["tasks"] = per_task
    atomic_write_json(out_dir / POOL_MANIFEST, manifest)
    return _built(out_dir, manifest, False, start)
