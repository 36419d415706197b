"""Faults a reliability probe found, each reproduced small: a failed start blocking the corrected
command, damaged run files giving tracebacks, huge rows tokenised whole, label words that differ
only in case, adapter configs whose bytes change between processes, unhelpful null-field errors."""

import json
import subprocess
import sys
import time

import pytest

from ftlab.errors import FtlabError
from ftlab.objectives import Encoder, prompt_ids
from ftlab.tasks import TaskSpec, load_file
from ftlab.train import train

from run_fixtures import SPEC, tiny_run_cfg, tiny_run_data


def _data():
    return tiny_run_data()


def _cfg(out, *overrides):
    return tiny_run_cfg(out, *overrides, steps=4, eval_every=2, checkpoint_every=2)


class _Killed(Exception):
    pass


def _kill_at_3(step, record):
    if step == 3:
        raise _Killed


# -- a failed start ---------------------------------------------------------------------------


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, tiny_model_factory, tiny_tokenizer):
    from ftlab.config import to_dict
    from ftlab.runs import claim_dir

    out = tmp_path / "run"
    typo = _cfg(out, f"data.task={tmp_path / 'typo.jsonl'}", "data.template={text} It was",
                "data.options=[' terrible', ' great']")
    with pytest.raises(FtlabError, match="file not found"):
        train(typo, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer))
    assert not out.exists()  # nothing written: the folder this call created is gone again
    # The config.json a failed start left (as earlier versions did, before loading) blocks nothing either.
    claim_dir(out, "train")
    (out / "config.json").write_text(json.dumps(to_dict(typo)))
    fixed = _cfg(out, "lr=2e-3")
    train(fixed, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-3
    assert (out / "results.json").exists()


# -- damaged run files ------------------------------------------------------------------------


def _damage(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if len(data) > 8 else b"\x00garbage")


@pytest.mark.parametrize("optimizer,name", [
    ("adamw", "config.json"), ("adamw", "checkpoint/state.json"), ("adamw", "checkpoint/optimizer.pt"),
    ("adamw", "checkpoint/trainable.safetensors"), ("mezo", "checkpoint/state.json"), ("mezo", "config.json")])
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path, tiny_model_factory, tiny_tokenizer, optimizer, name):
    cfg = _cfg(tmp_path / "run", f"optimizer={optimizer}")
    with pytest.raises(_Killed):
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer),
              data=_data(), callback=_kill_at_3)
    target = tmp_path / "run" / name
    assert target.exists()
    _damage(target)
    with pytest.raises(FtlabError) as e:
        train(cfg, progress=False, model_and_tokenizer=(tiny_model_factory("llama"), tiny_tokenizer), data=_data())
    message = str(e.value)
    assert f"{target} is damaged (" in message and "start afresh with --overwrite" in message, message
    assert len(message.splitlines()) == 1


def test_eval_output_naming_a_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ftlab.cli", "eval", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a folder" in lines[0], result.stderr


# -- a huge row ---------------------------------------------------------------------------------


def _whole(tokenizer, prompt, budget):
    """The cut the old code made: tokenise everything, keep the BOS and the last tokens."""
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) <= budget:
        return ids
    keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    return ([ids[0]] if keep_bos else []) + ids[len(ids) - budget + keep_bos:]


def test_a_10mb_row_is_cut_before_it_is_tokenised(tmp_path, tiny_tokenizer):
    path = tmp_path / "big.jsonl"
    huge = "the movie was long and " * (10_000_000 // 23)
    with path.open("w") as f:
        f.write(json.dumps({"text": huge + "great", "label": 1}) + "\n")
        f.write(json.dumps({"text": "short and bad", "label": 0}) + "\n")
    start = time.perf_counter()
    examples = load_file(path, SPEC)
    encoder = Encoder(tiny_tokenizer, SPEC, max_length=64)
    batch = encoder.classification(examples, [SPEC.prompt(e) for e in examples])
    seconds = time.perf_counter() - start
    assert batch.input_ids.shape == (2, 64) and seconds < 5, seconds  # whole: ~minutes and GBs
    # Cutting the text first keeps exactly the tokens the whole text gives.
    medium = "The quick brown fox, 42 times: " * 300 + "It was"
    for budget in (8, 64, 200):
        assert prompt_ids(tiny_tokenizer, medium, budget) == _whole(tiny_tokenizer, medium, budget)


# -- label words that differ only in case ------------------------------------------------------


def _jsonl(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_match_exactly_and_case_only_differences_are_an_error(tmp_path):
    cased = TaskSpec(name="t", template="{text}", options=[" Great", " great"])
    rows = [{"text": "a", "label": "Great"}, {"text": "b", "label": "great"}, {"text": "c", "label": 1}]
    assert [e.label for e in load_file(_jsonl(tmp_path, rows), cased)] == [0, 1, 1]
    with pytest.raises(FtlabError, match=r"d\.jsonl:1: field 'label': label 'GREAT' could be 'Great' and 'great', "
                                         r"which differ only in case"):
        load_file(_jsonl(tmp_path, [{"text": "a", "label": "GREAT"}]), cased)
    # Options that do not collide still match whatever the case.
    assert [e.label for e in load_file(_jsonl(tmp_path, [{"text": "a", "label": "GREAT"}]), SPEC)] == [1]


def test_a_null_label_is_named_as_null(tmp_path):
    with pytest.raises(FtlabError, match=r"d\.jsonl:1: field 'label' is null") as e:
        load_file(_jsonl(tmp_path, [{"text": "a", "label": None}]), SPEC)
    assert "missing" not in str(e.value)


# -- adapter configs -------------------------------------------------------------------------


def test_saved_adapter_configs_list_modules_in_sorted_order(tmp_path, tiny_model, tiny_tokenizer):
    from ftlab.models import LoraSettings, prepare_model, save_trained

    module = prepare_model(tiny_model, "lora", lora=LoraSettings(r=2, target_modules=["v_proj", "q_proj", "o_proj",
                                                                                       "k_proj", "up_proj"]))
    save_trained(module, tiny_tokenizer, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
