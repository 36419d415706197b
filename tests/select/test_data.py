"""Instruction data: JSONL formats, ids across files, response-only labels."""

from __future__ import annotations

import pytest

from ftlab.errors import FtlabError
from ftlab.select.data import InstructionExample, collate, encode, load_instructions

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


# -- the pool from the evals wheel ----------------------------------------------------------------
