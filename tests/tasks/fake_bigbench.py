"""Small fake BIG-bench data in the real formats, and an archive laid out like the real one."""

import io
import json
import tarfile
from pathlib import Path

from ftlab.tasks import bigbench

# Small stand-ins for the real files, in the real formats (see the real-data test for counts).
SENTIMENT = {"examples": [
    {"input": "Great doctor, very kind.",
     "target_scores": {"ambivalent": 0, "positive": 1, "negative": 0, "neutral": 0}},
    {"input": "The taxi arrives on time.",
     "target_scores": {"ambivalent": 0, "positive": 0, "negative": 0, "neutral": 1}},
    {"input": "Rude staff and dirty rooms. ",
     "target_scores": {"ambivalent": 0, "positive": 0, "negative": 1, "neutral": 0}},
    {"input": "Nice view but noisy.", "target_scores": {"ambivalent": 1, "positive": 0, "negative": 0, "neutral": 0}},
    {"input": "Great doctor, very kind.",
     "target_scores": {"ambivalent": 0, "positive": 1, "negative": 0, "neutral": 0}},
    {"input": "  ", "target_scores": {"ambivalent": 0, "positive": 1, "negative": 0, "neutral": 0}},
    {"input": "Never again.", "target_scores": {"ambivalent": 0, "positive": 0, "negative": 1, "neutral": 0}},
]}
STRATEGYQA = {"examples": [
    {"input": "Is it common to see frost during some college commencements?",
     "target_scores": {"Yes": 1, "No": 0}, "target": "Yes. ..."},
    {"input": "Hydrogen's atomic number squared exceeds number of Spice Girls?",
     "target_scores": {"Yes": 0, "No": 1}, "target": "No. ..."},
]}
NLI = {"examples": [
    {"input": f"Sentence 1: {p} \nSentence 2: {h}\n\nThe answer is: ",
     "target_scores": {"entailment": int(y == "e"), "neutral": int(y == "n"), "contradiction": int(y == "c")}}
    for p, h, y in [("He fell on his knees.", "He was standing earlier.", "e"),
                    ("She stopped smoking.", "She has a dog.", "n"),
                    ("The king of France is bald.", "France has no king.", "c")]
]}
SQUAD = {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [
    {"context": "Denver beat Carolina in Super Bowl 50.",
     "qas": [{"id": "a", "question": "Who won?", "answers": [
         {"answer_start": 0, "text": "Denver"}, {"answer_start": 0, "text": "Denver"},
         {"answer_start": 0, "text": "Denver Broncos"}]},
             {"id": "b", "question": "Who lost?", "answers": [{"answer_start": 12, "text": "Carolina"}]}]},
    {"context": "It was played in 2016.",
     "qas": [{"id": "c", "question": "When?", "answers": [{"answer_start": 17, "text": "2016"}]}]}]}]}

EPISTEMIC = {"examples": [
    {"input": "Premise: Amelia assumes that Joseph knows that a dog runs. Hypothesis: Joseph knows that a dog runs.",
     "target_scores": {"entailment": 0, "non-entailment": 1}},
    {"input": "Premise: Evelyn sees that a dog runs. Hypothesis: A dog runs.",
     "target_scores": {"entailment": 1, "non-entailment": 0}},
]}
ANALYTIC = {"examples": [
    {"input": "Lina met two nurses. So, Lina met at least one woman.",
     "target_scores": {"entailment": 0, "no-entailment": 1}},
    {"input": "Fido is a dog. Therefore Fido is a mammal.", "target_scores": {"entailment": 1, "no-entailment": 0}},
]}

TASK_FILES = {
    "multiemo/all_sentence_en/task.json": json.dumps(SENTIMENT).encode(),
    "epistemic_reasoning/task.json": json.dumps(EPISTEMIC).encode(),
    "analytic_entailment/task.json": json.dumps(ANALYTIC).encode(),
    "strategyqa/task.json": json.dumps(STRATEGYQA).encode(),
    "presuppositions_as_nli/task.json": json.dumps(NLI).encode(),
    "squad_shifts/squaddev_v1.1.json": json.dumps(SQUAD).encode(),
    "natural_instructions/subtask001_a/task.json": b'{"examples": [1]}',
    "natural_instructions/subtask002_b/task.json": b'{"examples": [2]}',
    # near misses that the default patterns must not extract
    "natural_instructions/subtask001_a/README.md": b"readme",
    "natural_instructions/nested/deeper/task.json": b"{}",
    "multiemo/all_text_en/task.json": b"{}",
}


def make_tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A .tar.gz laid out like bigbench-1.0.0.tar.gz, holding ``files`` under benchmark_tasks/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {"bigbench-1.0.0/setup.py": b"# not task data",
                           **{bigbench.MEMBER_PREFIX + rel: data for rel, data in files.items()}}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
