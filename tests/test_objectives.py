"""Objectives checked against naive, unbatched float64 references."""

import pytest
import torch

from ftlab import objectives
from ftlab.errors import FtlabError
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec

SENTENCES = ["the movie was great fun", "a terrible boring film", "great acting and a great story",
             "it was bad", "I loved every minute of this wonderful and great movie"]


def _examples():
    return [Example(id=f"t:{i}", fields={"text": s}, label=i % 2) for i, s in enumerate(SENTENCES)]


def _naive_option_score(model, tokenizer, prompt, option):
    """Mean log-prob of the option tokens, one unpadded sequence at a time."""
    p = tokenizer(prompt)["input_ids"]
    o = tokenizer(option, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([p + o])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(o)) / len(o)


@pytest.mark.parametrize("options", [[" terrible", " great"], [" not good at all", " great"]])
def test_option_scores_match_unbatched_reference(tiny_model, tiny_tokenizer, options):
    model = tiny_model.double()
    spec = TaskSpec(name="t", template="{text} It was", options=options)
    encoder = Encoder(tiny_tokenizer, spec)
    exs = _examples()
    batch = encoder.classification(exs, [spec.prompt(e) for e in exs])
    assert (batch.labels is None) == all(len(o) == 1 for o in encoder.option_ids)
    with torch.no_grad():
        got = objectives.option_scores(model, batch, encoder.option_ids)
        want = torch.tensor([[_naive_option_score(model, tiny_tokenizer, spec.prompt(e), o) for o in options]
                             for e in exs], dtype=got.dtype)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_loss_is_cross_entropy_over_label_word_logits(tiny_model, tiny_tokenizer):
    """For single-token label words the loss equals CE over the label words' raw logits
    (MeZO's classification loss), since log-softmax over the vocabulary only shifts them."""
    model = tiny_model.double()
    spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
    encoder = Encoder(tiny_tokenizer, spec)
    exs = _examples()
    with torch.no_grad():
        got = objectives.loss(model, encoder.classification(exs, [spec.prompt(e) for e in exs]),
                              encoder.option_ids)
        ref = []
        for e in exs:
            ids = tiny_tokenizer(spec.prompt(e))["input_ids"]
            last = model(input_ids=torch.tensor([ids])).logits[0, -1]
            word_logits = last[[o[0] for o in encoder.option_ids]]
            ref.append(-torch.log_softmax(word_logits, -1)[e.label])
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-9)


def test_generation_loss_is_answer_nll(tiny_model, tiny_tokenizer):
    model = tiny_model.double()
    spec = TaskSpec(name="qa", template="Context: {context} Question: {question} Answer:", metric="f1")
    exs = [Example(id="q:0", fields={"context": "the cat sat", "question": "who sat"}, answers=("the cat",)),
           Example(id="q:1", fields={"context": "a long story about a dog that ran far away",
                                     "question": "what ran"}, answers=("a dog", "dog"))]
    encoder = Encoder(tiny_tokenizer, spec)
    prompts = [spec.prompt(e) for e in exs]
    with torch.no_grad():
        got = objectives.loss(model, encoder.generation(prompts, [spec.target(e) for e in exs]), [])
        ref = [-_naive_option_score(model, tiny_tokenizer, p, spec.target(e) + objectives.ANSWER_END)
               for p, e in zip(prompts, exs)]
    assert got.item() == pytest.approx(sum(ref) / len(ref), rel=1e-9)


def test_greedy_decode_matches_naive_loop(tiny_model, tiny_tokenizer):
    spec = TaskSpec(name="qa", template="{q}", metric="f1", max_new_tokens=6)
    prompts = ["the movie was", "a great and wonderful story about the"]
    encoder = Encoder(tiny_tokenizer, spec)
    batch = encoder.generation(prompts, max_new_tokens=6)
    got = objectives.greedy_decode(tiny_model, tiny_tokenizer, batch, 6)
    for prompt, text in zip(prompts, got):
        ids = tiny_tokenizer(prompt)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = tiny_model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
                new.append(nxt)
                if nxt == tiny_tokenizer.eos_token_id or "\n" in tiny_tokenizer.decode([nxt]):
                    break
        want = tiny_tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()
        assert text == want


def test_prompt_truncation_keeps_the_query_end(tiny_tokenizer):
    spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
    encoder = Encoder(tiny_tokenizer, spec, max_length=8)
    long = Example(id="x", fields={"text": " ".join(["great"] * 50)}, label=1)
    batch = encoder.classification([long], [spec.prompt(long)])
    full = tiny_tokenizer(spec.prompt(long))["input_ids"]
    assert batch.input_ids.shape[1] == 8
    assert batch.input_ids[0, -3:].tolist() == full[-3:]


class _CollidingTokenizer:
    """Maps every word to the same id, as a lower-casing or <unk>-heavy tokenizer might."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [7] if text.strip() else []}


def test_colliding_label_words_are_rejected():
    with pytest.raises(FtlabError, match="tokenise identically"):
        objectives.encode_options(_CollidingTokenizer(), [" Good", " good"])
    with pytest.raises(FtlabError, match="tokenises to nothing"):
        objectives.encode_options(_CollidingTokenizer(), [" ", " good"])


def test_demonstrations_are_deterministic_and_exclude_the_query():
    spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
    exs = _examples()
    a = objectives.build_prompts(spec, exs, exs, k=2, seed=3)
    b = objectives.build_prompts(spec, exs[::-1], exs, k=2, seed=3)[::-1]
    assert a == b  # independent of batch composition and order
    for ex, prompt in zip(exs, a):
        parts = prompt.split(spec.demo_separator)
        assert len(parts) == 3 and parts[-1] == spec.prompt(ex)
        assert spec.demonstration(ex) not in parts[:-1]
    with pytest.raises(FtlabError, match="demonstration"):
        objectives.build_prompts(spec, exs, exs[:1], k=2)


@pytest.mark.parametrize("pred,gold,f1,em", [
    ("the cat sat", "a cat sat down", 0.8, 0.0),  # P=1, R=2/3 after dropping articles
    ("Denver Broncos!", "denver broncos", 1.0, 1.0),
    ("nothing", "something else", 0.0, 0.0),
])
def test_squad_metrics(pred, gold, f1, em):
    assert objectives.f1_score(pred, gold) == pytest.approx(f1)
    assert objectives.exact_match(pred, gold) == em


def test_non_differentiable_objectives_are_minus_the_eval_metrics(tiny_model, tiny_tokenizer):
    from ftlab.evaluate import evaluate

    spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
    exs = _examples()
    acc = objectives.objective_fn("accuracy", tiny_model, tiny_tokenizer, Encoder(tiny_tokenizer, spec), exs, "cpu")
    assert acc().item() == pytest.approx(-evaluate(tiny_model, tiny_tokenizer, spec, exs, progress=False)
                                         .metrics["accuracy"])
    qa = TaskSpec(name="qa", template="{q}", metric="f1", max_new_tokens=4)
    qs = [Example(id=f"q:{i}", fields={"q": q}, answers=(a,)) for i, (q, a) in
          enumerate([("the movie was", "great"), ("it was a", "story"), ("the film and the", "the acting")])]
    f1 = objectives.objective_fn("f1", tiny_model, tiny_tokenizer, Encoder(tiny_tokenizer, qa), qs, "cpu")
    assert f1().item() == pytest.approx(-evaluate(tiny_model, tiny_tokenizer, qa, qs, progress=False).metrics["f1"])
    with pytest.raises(FtlabError, match="does not fit"):
        objectives.objective_fn("f1", tiny_model, tiny_tokenizer, Encoder(tiny_tokenizer, spec), exs, "cpu")


def test_eval_loss_is_the_training_loss_over_all_examples(tiny_model, tiny_tokenizer):
    from ftlab.evaluate import evaluate

    spec = TaskSpec(name="t", template="{text} It was", options=[" terrible", " great"])
    exs = _examples()
    train_loss = objectives.objective_fn("loss", tiny_model, tiny_tokenizer, Encoder(tiny_tokenizer, spec), exs, "cpu")
    # evaluate() batches by length (batch 2 here): the mean of per-example losses must not depend on it
    metrics = evaluate(tiny_model, tiny_tokenizer, spec, exs, batch_size=2, progress=False).metrics
    assert metrics["loss"] == pytest.approx(train_loss().item(), rel=1e-5)


def test_generation_rows_fit_the_window_and_every_target_has_a_context(tiny_model, tiny_tokenizer):
    """An answer longer than max_length is cut to leave one conditioning token, and with an empty
    prompt its first token becomes the context: the loss is finite and the rows fit the window
    (this used to index past the logits)."""
    spec = TaskSpec(name="lm", template="{text}", metric="f1")
    encoder = Encoder(tiny_tokenizer, spec, max_length=8)
    long_answer = " ".join(["word"] * 40)
    batch = encoder.generation(["", "a b"], [long_answer, "c d"])
    assert batch.input_ids.shape[1] <= 8 and batch.labels.shape[1] < batch.input_ids.shape[1]
    with torch.no_grad():
        value = objectives.loss(tiny_model.double(), batch, [])
    assert torch.isfinite(value)
