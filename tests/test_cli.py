"""The CLI end to end in subprocesses: help texts, listings, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest


def ftlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ftlab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["demo"], ["replay"], ["data", "prepare"]])
def test_help(command):
    result = ftlab(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_show_config_applies_overrides():
    result = ftlab("train", "-c", "sentiment-lora", "lr=3e-4", "lora.r=4", "--show-config")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0003" in result.stdout and "r: 4" in result.stdout and "mode: lora" in result.stdout
    result = ftlab("train", "--optimizer", "mezo", "--mode", "prefix", "zo.eps=0.1", "--show-config")
    assert "optimizer: mezo" in result.stdout and "mode: prefix" in result.stdout and "eps: 0.1" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["eval", "--task", "no-such-task"], "unknown task 'no-such-task'"),
    (["train", "lrr=1"], "unknown key(s) ['lrr']"),
    (["train", "-c", "missing.yaml"], "missing.yaml not found"),
])
def test_bad_input_is_one_line_error(args, message):
    result = ftlab(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_jsonl_names_file_line_and_field(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text(json.dumps({"review": "great", "label": 1}) + "\n" + json.dumps({"label": 0}) + "\n")
    result = ftlab("eval", "--task", str(data), "--template", "{review} It was", "--options", " bad, great")
    assert result.returncode == 2
    assert "reviews.jsonl:2" in result.stderr and "review" in result.stderr
