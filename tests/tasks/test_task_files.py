"""Tasks from .jsonl/.csv files and HF datasets: label forms, and errors naming file:line and field."""

import json
import sys

import pytest

from ftlab.errors import FtlabError
from ftlab.tasks import TaskSpec, load_file, load_hf, load_task

SPEC = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
QA = TaskSpec(name="qa", template="Q: {question}\nA:", metric="f1")


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_label_forms(tmp_path):
    path = _jsonl(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": "0"}, "",
                             {"text": "c", "label": "Great"}, {"text": "d", "label": " BAD "}])
    examples = load_file(path, SPEC, label_names=["bad", "good"])
    assert [e.label for e in examples] == [1, 0, 1, 0]
    assert [e.id for e in examples] == ["d.jsonl:0", "d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]
    assert examples[2].source == f"{path}:4"  # blank line 3 skipped, line numbers kept
    assert examples[2].fields == {"text": "c"}


def test_csv_rows_and_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    # a byte-order mark, as spreadsheets write it, must not rename the first column
    path.write_text("text,label,extra\n\"multi\nline\",great,x\nplain,0,y\n", encoding="utf-8-sig")
    examples = load_file(path, SPEC)
    assert [(e.fields["text"], e.label) for e in examples] == [("multi\nline", 1), ("plain", 0)]
    assert examples[1].source == f"{path}:4"


def test_generation_answers_forms(tmp_path):
    path = _jsonl(tmp_path, [{"question": "q1", "answers": "x"}, {"question": "q2", "answers": ["y", " z "]},
                             {"question": "q3", "answers": {"text": ["w"], "answer_start": [0]}}])
    assert [e.answers for e in load_file(path, QA)] == [("x",), ("y", "z"), ("w",)]


@pytest.mark.parametrize("rows,match", [
    ([{"text": "a", "label": 0}, "{not json"], r"d\.jsonl:2: invalid JSON"),
    ([{"text": "a", "label": 0}, {"txt": "b", "label": 1}],
     r"d\.jsonl:2: missing field 'text' \(fields present: 'txt', 'label'\)"),
    ([{"text": "a"}], r"d\.jsonl:1: missing field 'label'"),
    ([{"text": "a", "label": "meh"}], r"d\.jsonl:1: field 'label': label 'meh' is not recognised; "
                                      r"valid labels: 0\.\.1, 'terrible', 'great'"),
    ([{"text": "a", "label": 2}], r"d\.jsonl:1: field 'label': label 2 is not recognised"),
    ([{"text": "a", "label": True}], r"d\.jsonl:1: field 'label'"),
    ([{"text": ["a"], "label": 0}], r"d\.jsonl:1: field 'text' must be text"),
    (["[1, 2]"], r"d\.jsonl:1: expected a JSON object"),
    (["", "  "], r"d\.jsonl: no examples"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, rows, match):
    with pytest.raises(FtlabError, match=match):
        load_file(_jsonl(tmp_path, rows), SPEC)


def test_csv_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,great\nb\n", encoding="utf-8")
    with pytest.raises(FtlabError, match=r"d\.csv:3: missing field 'label' \(fields present: 'text'"):
        load_file(path, SPEC)
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(FtlabError, match=r"d\.csv: no examples"):
        load_file(path, SPEC)
    path.write_bytes(b"text,label\n\xff\xfe,0\n")
    with pytest.raises(FtlabError, match=r"d\.csv:2: not UTF-8"):
        load_file(path, SPEC)


def test_missing_answers_and_bad_answers(tmp_path):
    with pytest.raises(FtlabError, match=r"d\.jsonl:1: missing field 'answers'"):
        load_file(_jsonl(tmp_path, [{"question": "q"}]), QA)
    with pytest.raises(FtlabError, match=r"d\.jsonl:1: field 'answers' must be a non-empty"):
        load_file(_jsonl(tmp_path, [{"question": "q", "answers": []}]), QA)


def test_path_errors(tmp_path):
    with pytest.raises(FtlabError, match=r"nope\.jsonl: file not found"):
        load_file(tmp_path / "nope.jsonl", SPEC)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(FtlabError, match=r"d\.txt: unsupported file type '\.txt'; use \.jsonl or \.csv"):
        load_file(tmp_path / "d.txt", SPEC)
    with pytest.raises(FtlabError, match="3 label_names"):
        load_file(_jsonl(tmp_path, [{"text": "a", "label": 0}]), SPEC, label_names=["a", "b", "c"])


def test_loading_writes_nothing(tmp_path):
    path = _jsonl(tmp_path, [{"text": "a", "label": 0}])
    before = sorted(tmp_path.rglob("*"))
    load_file(path, SPEC)
    assert sorted(tmp_path.rglob("*")) == before


def test_load_task_on_files(tmp_path):
    path = _jsonl(tmp_path, [{"text": "a", "y": "great"}])
    spec, examples = load_task(str(path), template="{text} It was", options=[" terrible", " great"], label_field="y")
    assert spec.name == str(path) and examples[0].label == 1
    qa = _jsonl(tmp_path, [{"question": "q", "answers": "a"}], name="qa.jsonl")
    spec, examples = load_task(str(qa), template="Q: {question}\nA:", metric="f1")
    assert spec.kind == "generation" and examples[0].answers == ("a",)
    with pytest.raises(FtlabError, match="give a prompt template"):
        load_task(str(path), options=[" terrible", " great"])
    with pytest.raises(FtlabError, match="give the label words"):
        load_task(str(path), template="{text} It was")
    with pytest.raises(FtlabError, match="drop the options"):
        load_task(str(qa), template="Q: {question}\nA:", metric="f1", options=[" a", " b"])
    with pytest.raises(FtlabError, match="file not found"):
        load_task(str(tmp_path / "missing.csv"), template="{text}", options=[" a", " b"])


def test_load_hf_shares_the_row_handling(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"sentence": "fine", "label": 1}, {"sentence": "bad", "label": 0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec, examples = load_task("hf:glue", template="{sentence} It was", options=[" terrible", " great"],
                               hf_split="validation", hf_config="sst2")
    assert calls == [("glue", "sst2", "validation")]
    assert [(e.id, e.label, e.source) for e in examples] == [
        ("glue:0", 1, "hf:glue[validation]:0"), ("glue:1", 0, "hf:glue[validation]:1")]
    with pytest.raises(FtlabError, match=r"hf:glue\[validation\]:0: missing field 'text'"):
        load_hf("glue", SPEC, split="validation")


def test_load_hf_errors_are_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FtlabError, match=r"^hf:x\[train\]: could not load the dataset: Couldn't reach the Hub$"):
        load_hf("x", SPEC, split="train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(FtlabError, match=r"pip install 'ftlab\[hub\]'"):
        load_hf("x", SPEC, split="train")
