"""Instruction data: JSONL formats, ids across files, response-only labels, the BIG-bench pool."""

from __future__ import annotations

import json

import pytest

from ftlab.errors import FtlabError
from ftlab.select.data import (
    InstructionExample,
    PoolSpec,
    build_bigbench_pool,
    collate,
    encode,
    load_instructions,
    subtask_family,
)

from less_fixtures import write_jsonl


def test_both_formats_several_files_and_ids(tmp_path):
    a = write_jsonl(tmp_path / "a" / "data.jsonl", [
        {"prompt": "Is it good?", "response": " yes", "task": "qa"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
    ])
    b = write_jsonl(tmp_path / "b" / "data.jsonl", [{"prompt": "p", "response": "r", "family": "fam"}])
    b.write_text("\n" + b.read_text())  # a blank first line: ids keep the real line number
    examples = load_instructions([a, b])
    assert [ex.id for ex in examples] == [f"{a}:1", f"{a}:2", f"{b}:2"]  # same file name, no clash
    assert examples[0].messages == ({"role": "user", "content": "Is it good?"},) and examples[0].response == " yes"
    assert examples[1].messages[0]["role"] == "system" and examples[1].response == "Hello"
    assert (examples[0].task, examples[1].task, examples[2].task, examples[2].family) == ("qa", "data", "data", "fam")
    assert examples[2].source == (str(b), 2)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "only a prompt"}, "needs 'messages'"),
    ({"messages": [{"role": "user", "content": "no answer"}]}, "ending with the assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "'messages' must be"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, row])
    with pytest.raises(FtlabError, match=f"bad.jsonl:2: .*{message}"):
        load_instructions([path])


def test_missing_empty_and_duplicate_files(tmp_path):
    with pytest.raises(FtlabError, match="not found"):
        load_instructions([tmp_path / "nope.jsonl"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FtlabError, match="no examples"):
        load_instructions([empty])
    with pytest.raises(FtlabError, match="twice"):
        load_instructions([empty, empty])


def _example(prompt: str, response: str) -> InstructionExample:
    return InstructionExample("f:1", ({"role": "user", "content": prompt},), response, "t", "t")


def test_labels_cover_exactly_the_response_plus_eos(tiny_tokenizer):
    ids, n = encode(tiny_tokenizer, _example("The movie was", " great"), 64)
    response = tiny_tokenizer(" great", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert n == len(response) and ids[-n:] == response
    assert tiny_tokenizer.decode(ids[:-n]) == "The movie was\n"  # no chat template: plain prompt + newline
    short, n_short = encode(tiny_tokenizer, _example("It was", " good and the plot was bad"), 64)
    batch = collate([(ids, n), (short, n_short)], tiny_tokenizer.pad_token_id)
    for row, (seq, k) in enumerate([(ids, n), (short, n_short)]):
        assert batch.input_ids[row, -len(seq):].tolist() == seq  # left padded
        assert batch.attention_mask[row].sum() == len(seq)
        labels = batch.labels[row]
        assert labels[labels != -100].tolist() == seq[-k:]  # loss on the response only
        assert batch.position_ids[row, -1] == len(seq) - 1


def test_truncation_keeps_response_and_prompt_tail(tiny_tokenizer):
    ex = _example("the movie " * 50 + "was", " great " * 40)
    ids, n = encode(tiny_tokenizer, ex, 32)
    assert len(ids) == 32 and n == 16
    assert ids[:16] == tiny_tokenizer("the movie " * 50 + "was\n", add_special_tokens=False)["input_ids"][-16:]


def test_plain_prompt_starts_with_the_bos_the_tokenizer_prepends(tiny_tokenizer):
    """Gemma's GGUF tokenizer has no chat template but needs <bos>; truncation must keep it."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = tok.eos_token
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                                  special_tokens=[(tok.bos_token, bos)])
    assert tok("a")["input_ids"][0] == bos
    ids, n = encode(tok, _example("The movie was", " great"), 64)
    assert ids[0] == bos and tok.decode(ids[1:-n]) == "The movie was\n"
    ids, n = encode(tok, _example("the movie " * 50 + "was", " great " * 40), 32)
    assert len(ids) == 32 and n == 16 and ids[0] == bos
    assert ids[1:16] == tok("the movie " * 50 + "was\n", add_special_tokens=False)["input_ids"][-15:]


def test_empty_response_has_no_target_and_collate_refuses_it(tiny_tokenizer):
    ids, n = encode(tiny_tokenizer, _example("The movie was", ""), 64)
    assert n == 0 and ids
    with pytest.raises(FtlabError, match="no response tokens"):
        collate([(ids, n)], tiny_tokenizer.pad_token_id)


def test_chat_template_is_used_when_present(tiny_tokenizer):
    import copy

    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    ids, n = encode(templated, _example("Hi", " yes"), 64)
    assert templated.decode(ids[:-n]) == "<user>Hi<assistant>"


def test_subtask_family():
    assert subtask_family("subtask002_quoref_answer_generation") == "quoref"
    assert subtask_family("subtask046_miscellaenous_question_typing") == "misc"
    assert subtask_family("subtask043_essential_terms_answering_incomplete_questions") == "essential_terms"
    with pytest.raises(FtlabError, match="not a natural_instructions subtask"):
        subtask_family("strategyqa")


def test_bigbench_pool_from_fake_files(tmp_path, monkeypatch):
    """The pool builder on a fake extracted BIG-bench: disjoint pool/targets, families, sizes."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FTLAB_CACHE", str(root))
    for name in ("subtask001_alpha_question_generation", "subtask002_alpha_answer_generation", "subtask003_beta_x"):
        folder = root / "bigbench" / "natural_instructions" / name
        folder.mkdir(parents=True)
        examples = [{"input": f"{name} input {i}", "target": [f"answer {i}"]} for i in range(10)]
        examples.append({"input": "x" * 2000, "target": ["too long"]})
        folder.joinpath("task.json").write_text(json.dumps(
            {"task_prefix": f"Definition: Do {name}. More details here.", "examples": examples}))
    paths = build_bigbench_pool(tmp_path / "out", PoolSpec(per_task=5, n_target=2, max_chars=500, other_tasks=[]))
    assert sorted(paths) == ["alpha", "beta", "pool"]
    pool = load_instructions([paths["pool"]])
    alpha = load_instructions([paths["alpha"]])
    assert len(pool) == 15 and len(alpha) == 4 and len(load_instructions([paths["beta"]])) == 2
    assert {ex.family for ex in pool} == {"alpha", "beta"}
    assert {ex.task for ex in alpha} == {"subtask001_alpha_question_generation", "subtask002_alpha_answer_generation"}
    pool_texts = {ex.messages[0]["content"] for ex in pool}
    assert not pool_texts & {ex.messages[0]["content"] for ex in alpha}  # targets held out
    assert all(ex.messages[0]["content"].startswith(f"Do {ex.task}.\n\n") for ex in pool)  # first sentence only
    assert all("too long" != ex.response for ex in pool)
    again = build_bigbench_pool(tmp_path / "again", PoolSpec(per_task=5, n_target=2, max_chars=500, other_tasks=[]))
    assert again["pool"].read_text() == paths["pool"].read_text()  # seeded
