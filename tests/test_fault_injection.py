"""Fault injection: every file a run writes and ftlab reads back, flipped, cut and edited.

For a tiny AdamW run and a tiny MeZO run (LoRA on a 1-layer in-memory llama, a 12-row JSONL
task), each file is damaged in three ways -- one flipped bit in its middle, cut to half its
length, edited (a value changed the way a person or a tool would, the file left well-formed) --
and then read back the way ftlab reads it: a killed run resumed (``train``), a finished run's
MeZO trajectory replayed (``replay_run``), its model loaded (``load_trained``), a finished run
rerun (``train`` returns its results). Each case must either stop with a one-line
:class:`FtlabError` or give exactly the result of the undamaged run (a documented recovery, e.g. a
flipped bit in JSON whitespace, or a damaged line past the checkpoint that a resume drops anyway)
-- never a different result, never another exception.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftlab.config import TrainConfig, from_dict
from ftlab.errors import FtlabError
from ftlab.models import load_trained
from ftlab.train import replay_run, train

from run_fixtures import tiny_run_cfg

STEPS, KILL_AT = 4, 3  # checkpoints at steps 2 and 4; the killed run stops after step 3
WORDS = ["bad", "good"]


class _Killed(Exception):
    pass


def _kill(step: int, record: dict) -> None:
    if step == KILL_AT:
        raise _Killed


def _write_task(path: Path, words: list[str]) -> Path:
    rows = [{"text": f"the movie was {words[i % 2]} {i}", "label": i % 2} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer) -> dict[str, Any]:
    """A tiny base model folder and a data file, shared by the module (read-only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("world")
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tiny_tokenizer.pad_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).float().save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    return {"root": root, "base": root / "base", "task": _write_task(root / "task.jsonl", WORDS)}


def _cfg(world: dict[str, Any], out: Path, optimizer: str, eval_every: int = 2) -> TrainConfig:
    return tiny_run_cfg(out, f"model={world['base']}", f"optimizer={optimizer}", "mode=lora",
                        *(["lr=1e-3"] if optimizer == "adamw" else ["lr=1e-2", "zo.eps=1e-2"]),
                        f"data.task={world['task']}", "data.template={text} It was",
                        "data.options=[' terrible', ' great']", "data.n_train=8", "data.n_dev=2", "data.n_test=2",
                        steps=STEPS, eval_every=eval_every, checkpoint_every=2)


def _copy(run: Path, to: Path) -> Path:
    """A copy of run folder ``run`` that ftlab can continue at ``to`` (its output_dir moved along)."""
    shutil.copytree(run, to)
    config = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**config, "output_dir": str(to)}, indent=2))
    return to


def _digest(folder: Path) -> dict[str, str]:
    """The sha256 of every file of trained tensors under ``folder``: the model's, the best and the
    last checkpoint's (the end of training, which dev selection may not pick), the MeZO log."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.suffix in (".safetensors", ".bin")}


def _outcome(run: Path, results: dict[str, Any]) -> dict[str, Any]:
    return {"results": results, "tensors": _digest(run), "metrics": (run / "metrics.jsonl").read_text()}


def _resume(world: dict[str, Any], run: Path, optimizer: str) -> dict[str, Any]:
    """Resume ``run`` as a user would: with the config saved in it (the original config if that
    file no longer parses)."""
    cfg = _cfg(world, run, optimizer)
    try:
        cfg = from_dict(TrainConfig, json.loads((run / "config.json").read_text()))
    except (ValueError, TypeError, UnicodeDecodeError):
        pass
    return _outcome(run, train(cfg, progress=False))


@pytest.fixture(scope="module")
def runs(world) -> dict[str, dict[str, Any]]:
    """Per optimizer: a killed run (``killed``), the result of resuming an undamaged copy of it
    (``expected``), the finished run (``finished``) and its replayed tensors (MeZO), and a run
    without dev selection (``final``: its model holds the last step's weights, not the initial
    ones the tiny dev set picks) and what its model computes (``loaded``)."""
    out: dict[str, dict[str, Any]] = {}
    for optimizer in ("adamw", "mezo"):
        killed = world["root"] / f"{optimizer}-killed"
        with pytest.raises(_Killed):
            train(_cfg(world, killed, optimizer), progress=False, callback=_kill)
        finished = world["root"] / f"{optimizer}-finished"
        _copy(killed, finished)
        expected = _resume(world, finished, optimizer)
        final = world["root"] / f"{optimizer}-final"
        train(_cfg(world, final, optimizer, eval_every=0), progress=False)
        entry = {"killed": killed, "finished": finished, "expected": expected, "final": final,
                 "loaded": _trained_tensors(world, final)}
        if optimizer == "mezo":
            entry["replayed"] = _replayed(finished)
        out[optimizer] = entry
    return out


def _what_it_computes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors and the logits on fixed ids (which also see e.g. LoRA's alpha)."""
    out = {n: p.detach().clone() for n, p in module.named_parameters() if "lora" in n}
    with torch.no_grad():
        out["logits"] = module(input_ids=torch.arange(1, 9).unsqueeze(0)).logits
    return out


def _trained_tensors(world: dict[str, Any], run: Path) -> dict[str, torch.Tensor]:
    return _what_it_computes(load_trained(str(world["base"]), run / "model")[0])


def _replayed(run: Path) -> dict[str, torch.Tensor]:
    return _what_it_computes(replay_run(run)[0].eval())


# -- the faults ---------------------------------------------------------------------------------

def flip(path: Path) -> None:
    """One flipped bit in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def cut(path: Path) -> None:
    """The file cut to half its length (a copy interrupted, a full disk)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _edit_json(path: Path, change: Callable[[Any], None]) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value, indent=2))


def _edit_safetensors(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata=metadata)  # well-formed, its metadata (and any hash in it) kept


def _edit_optimizer(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    for state in saved["optimizer"]["state"].values():
        state["exp_avg"].view(-1)[0] += 1.0
        break
    torch.save(saved, path)


def _edit_trajectory(path: Path) -> None:
    """The last record's projected gradient changed (its checksum left as it was)."""
    data = bytearray(path.read_bytes())
    at = len(data) - 20 + 8
    data[at:at + 4] = struct.pack("<f", struct.unpack("<f", bytes(data[at:at + 4]))[0] + 1.0)
    path.write_bytes(bytes(data))


def _edit_metrics(path: Path) -> None:
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    first["loss"] = (first.get("loss") or 0.0) + 1.0
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")


def _edit_manifest(path: Path) -> None:
    def change(manifest: dict) -> None:
        name = sorted(manifest["files"])[0]
        digest = manifest["files"][name]["sha256"]
        manifest["files"][name]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    _edit_json(path, change)


def _set(key: str, value: Any) -> Callable[[Any], None]:
    def change(obj: Any) -> None:
        *parents, leaf = key.split(".")
        for p in parents:
            obj = obj[p]
        obj[leaf] = value
    return change


EDITS: dict[str, Callable[[Path], None]] = {
    "config.json": lambda p: _edit_json(p, _set("weight_decay", 0.5)),
    "config.json:lora.alpha": lambda p: _edit_json(p, _set("lora.alpha", 32)),
    "checkpoint/state.json": lambda p: _edit_json(p, _set("best_score", 1.5)),
    "checkpoint/state.json:step": lambda p: _edit_json(p, _set("step", 1)),
    "checkpoint/trainable.safetensors": _edit_safetensors,
    "checkpoint/optimizer.pt": _edit_optimizer,
    "checkpoint/ftlab-manifest.json": _edit_manifest,
    "best.safetensors": _edit_safetensors,
    "trajectory.bin": _edit_trajectory,
    "metrics.jsonl": _edit_metrics,
    "results.json": lambda p: _edit_json(p, _set("best_dev", 0.123)),
    "model/adapter_model.safetensors": _edit_safetensors,
    "model/adapter_config.json": lambda p: _edit_json(p, _set("lora_alpha", 32)),
}


def _fault(run: Path, target: str, kind: str) -> None:
    path = run / target.split(":")[0]
    assert path.is_file(), path
    {"flip": flip, "cut": cut, "edit": EDITS[target]}[kind](path)


def _one_line_error_or(expected: Any, action: Callable[[], Any], same: Callable[[Any, Any], bool]) -> None:
    """``action()`` raises a one-line FtlabError, or returns what the undamaged run gave."""
    try:
        got = action()
    except FtlabError as e:
        assert len(str(e).splitlines()) == 1, str(e)
        return
    assert same(got, expected), "a damaged file gave a different result silently"


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KINDS = ["flip", "cut", "edit"]


def _cases(targets: list[str]) -> list[tuple[str, str]]:
    """(file, fault) pairs; a ``file:what`` target is a second edit of ``file`` only."""
    return [(t, k) for t in targets for k in KINDS if k == "edit" or ":" not in t]


RESUMED = {
    "adamw": ["config.json", "config.json:lora.alpha", "checkpoint/state.json", "checkpoint/state.json:step",
              "checkpoint/trainable.safetensors", "checkpoint/optimizer.pt", "checkpoint/ftlab-manifest.json",
              "best.safetensors", "metrics.jsonl"],
    "mezo": ["config.json", "config.json:lora.alpha", "checkpoint/state.json", "checkpoint/state.json:step",
             "checkpoint/ftlab-manifest.json", "trajectory.bin", "best.safetensors", "metrics.jsonl"],
}


@pytest.mark.parametrize("optimizer,target,kind", [(o, *c) for o, targets in RESUMED.items() for c in _cases(targets)])
def test_a_damaged_file_stops_a_resume_or_changes_nothing(runs, world, tmp_path, optimizer, target, kind):
    run = _copy(runs[optimizer]["killed"], tmp_path / "run")
    _fault(run, target, kind)
    _one_line_error_or(runs[optimizer]["expected"], lambda: _resume(world, run, optimizer), lambda a, b: a == b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("optimizer,target", [(o, t) for o in ("adamw", "mezo") for t in
                                              ("model/adapter_model.safetensors", "model/adapter_config.json")])
def test_a_damaged_model_file_is_refused_by_load_trained(runs, world, tmp_path, optimizer, target, kind):
    run = _copy(runs[optimizer]["final"], tmp_path / "run")
    _fault(run, target, kind)
    _one_line_error_or(runs[optimizer]["loaded"], lambda: _trained_tensors(world, run), _same_tensors)


@pytest.mark.parametrize("target,kind", _cases(["config.json", "config.json:lora.alpha", "trajectory.bin"]))
def test_a_damaged_file_stops_a_replay(runs, tmp_path, target, kind):
    run = _copy(runs["mezo"]["finished"], tmp_path / "run")
    _fault(run, target, kind)
    _one_line_error_or(runs["mezo"]["replayed"], lambda: _replayed(run), _same_tensors)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("optimizer", ["adamw", "mezo"])
def test_a_damaged_results_file_is_refused_when_read_back(runs, world, tmp_path, optimizer, kind):
    run = _copy(runs[optimizer]["finished"], tmp_path / "run")
    _fault(run, "results.json", kind)
    expected = runs[optimizer]["expected"]["results"]
    _one_line_error_or(expected, lambda: train(_cfg(world, run, optimizer), progress=False), lambda a, b: a == b)


# -- data edited between a kill and the resume ---------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "mezo"])
def test_a_data_file_edited_before_the_resume_is_named(world, tmp_path, optimizer):
    task = _write_task(tmp_path / "task.jsonl", WORDS)
    cfg = _cfg({**world, "task": task}, tmp_path / "run", optimizer)
    with pytest.raises(_Killed):
        train(cfg, progress=False, callback=_kill)
    _write_task(task, ["awful", "fine"])  # edited between the kill and the resume
    with pytest.raises(FtlabError) as e:
        train(cfg, progress=False)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert str(task) in message and "train examples differ" in message, message
