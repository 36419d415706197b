"""eNTK computation: against explicit per-example gradients (float64), the sign kernel's
definition and asymmetry, projection, resumable folders and bad input."""

from __future__ import annotations

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.kernel import KernelSpec, compute_kernel, load_kernel, readout_matrix, select_parameters
from ftlab.kernel.chunks import length_chunks, plan_rows
from ftlab.kernel.outputs import encode_rows, label_word_ids
from ftlab.kernel.store import PARTIAL
from ftlab.objectives import Encoder
from ftlab.tasks.base import TaskSpec

from kernel_helpers import SPEC, examples, explicit_jacobians


@pytest.mark.parametrize("output", ["logits", "contrast"])
def test_exact_kernel_equals_gram_of_explicit_gradients(gpt2_64, tiny_tokenizer, tmp_path, output):
    exs = examples()
    # Small blocks and chunks: the kernel is summed over 3+ parameter blocks and padded chunks
    # (max_padding=10: chunks of 3 whatever the lengths).
    kspec = KernelSpec(params=r"re:h\.1\.", output=output, chunk_size=3, max_padding=10.0, max_block_mb=1.0)
    kd = compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs[:5], exs[5:], kspec, tmp_path / "k", progress=False)
    names = select_parameters(gpt2_64, kspec.params)
    jac = explicit_jacobians(gpt2_64, tiny_tokenizer, SPEC, exs, names, readout_matrix(3, output))
    sgd = torch.einsum("aop,bqp->aboq", jac, jac[:5])
    sign = torch.einsum("aop,bqp->aboq", jac, torch.sign(jac[:5]))
    assert kd.tensors["sgd"].shape == (8, 5, jac.shape[1], jac.shape[1])
    torch.testing.assert_close(kd.tensors["sgd"], sgd, rtol=1e-10, atol=1e-10 * sgd.abs().max())
    torch.testing.assert_close(kd.tensors["sign"], sign, rtol=1e-10, atol=1e-10 * sign.abs().max())
    # f0 is the readout of the label-word logits of each example.
    encoder = Encoder(tiny_tokenizer, SPEC)
    with torch.no_grad():
        logits = gpt2_64(**{k: v for k, v in vars(encode_rows(encoder, exs[:1])).items()
                            if k in ("input_ids", "attention_mask")}).logits[0, -1, label_word_ids(encoder)]
    torch.testing.assert_close(kd.f0_train[0], logits @ readout_matrix(3, output))


def test_sign_kernel_is_asymmetric_and_sgd_kernel_symmetric(gpt2_64, tiny_tokenizer, tmp_path):
    exs = examples(5)
    kd = compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs, [], KernelSpec(params=r"re:h\.1\.mlp"),
                        tmp_path / "k", progress=False)
    sgd, sign = kd.train("sgd"), kd.train("sign")
    flat = lambda k: k.permute(0, 2, 1, 3).reshape(15, 15)  # noqa: E731
    torch.testing.assert_close(flat(sgd), flat(sgd).T)
    assert (flat(sign) - flat(sign).T).abs().max() > 1e-3 * flat(sign).abs().max()
    # <J(x), sign(J(x))> = ||J(x)||_1 per output row: positive on the diagonal.
    assert (torch.diagonal(flat(sign)) > 0).all()


def test_llama_padding_and_eager_attention_match_unpadded_reference(tiny_model, tiny_tokenizer, tmp_path):
    """Llama's eager softmax runs in float32, so agreement is to float32 precision."""
    model = tiny_model.double()
    exs = examples(6)
    kspec = KernelSpec(params=r"re:layers\.1\.", chunk_size=4, max_padding=10.0)  # padded chunks of 4
    kd = compute_kernel(model, tiny_tokenizer, SPEC, exs[:4], exs[4:], kspec,
                        tmp_path / "k", progress=False)
    jac = explicit_jacobians(model, tiny_tokenizer, SPEC, exs, select_parameters(model, r"re:layers\.1\."),
                             torch.eye(3, dtype=torch.float64))
    sgd = torch.einsum("aop,bqp->aboq", jac, jac[:4])
    assert torch.isfinite(kd.tensors["sgd"]).all()
    assert (kd.tensors["sgd"] - sgd).abs().max() < 1e-5 * sgd.abs().max()


def test_projected_kernel_approximates_exact(tiny_model, tiny_tokenizer, tmp_path):
    exs = examples()
    params = "re:layers\\.1\\.mlp"
    exact = compute_kernel(tiny_model, tiny_tokenizer, SPEC, exs[:5], exs[5:], KernelSpec(params=params),
                           tmp_path / "exact", progress=False)
    proj = compute_kernel(tiny_model, tiny_tokenizer, SPEC, exs[:5], exs[5:],
                          KernelSpec(params=params, projection_dim=4096, chunk_size=3), tmp_path / "proj",
                          progress=False)
    from ftlab.kernel.entk import projection_error
    err = projection_error(exact, proj)
    # JL: relative inner-product error ~ sqrt(2/d) per entry; the Frobenius ratio is of that order.
    assert err["sgd"] < 0.1 and err["sign"] < 0.1
    assert err["sgd"] > 0  # it is a projection, not the exact kernel


@pytest.mark.parametrize("kill_after", [2, 5])  # inside the first block / inside a later block
def test_interrupted_computation_resumes_to_same_kernel(gpt2_64, tiny_tokenizer, tmp_path, monkeypatch, kill_after):
    exs = examples()
    # 5 train + 3 test rows in chunks of 2: per block the train part and 2 test chunks (3 steps).
    kspec = KernelSpec(params=r"re:h\.1\.", chunk_size=2, max_block_mb=1.0)
    full = compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs[:5], exs[5:], kspec, tmp_path / "a", progress=False)
    from ftlab.kernel import store as store_mod

    original = store_mod.PartialState.save
    saved = []

    def dying_save(self, done):
        original(self, done)
        saved.append(done)
        if len(saved) == kill_after:
            raise KeyboardInterrupt  # killed right after a save
    monkeypatch.setattr(store_mod.PartialState, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs[:5], exs[5:], kspec, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / PARTIAL).exists()
    resumed_saves = []
    monkeypatch.setattr(store_mod.PartialState, "save", lambda self, d: (resumed_saves.append(d), original(self, d)))
    resumed = compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs[:5], exs[5:], kspec, tmp_path / "b", progress=False)
    assert resumed_saves[0] == kill_after + 1  # nothing saved before the kill is redone
    torch.testing.assert_close(resumed.tensors["sgd"], full.tensors["sgd"])
    torch.testing.assert_close(resumed.tensors["sign"], full.tensors["sign"])
    assert not (tmp_path / "b" / PARTIAL).exists()


def test_kernel_of_another_model_task_or_split_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    exs = examples(6)
    kspec = KernelSpec(params=r"re:layers\.1\.mlp")
    compute_kernel(tiny_model, tiny_tokenizer, SPEC, exs[:4], exs[4:], kspec, tmp_path / "k",
                   identity={"model": "tiny"}, progress=False)
    with pytest.raises(FtlabError, match="model='tiny', not 'other'"):
        load_kernel(tmp_path / "k", {"identity": {"model": "other"}})
    with pytest.raises(FtlabError, match="other task"):
        load_kernel(tmp_path / "k", {"task": "trec"})
    with pytest.raises(FtlabError, match="other train_ids"):
        load_kernel(tmp_path / "k", {"train_ids": [e.id for e in exs[1:5]]})
    # Computing into the folder with another split is refused too, naming what differs.
    with pytest.raises(FtlabError, match="holds a kernel written with other settings.*train_ids"):
        compute_kernel(tiny_model, tiny_tokenizer, SPEC, exs[1:5], exs[4:], kspec, tmp_path / "k", progress=False)
    with pytest.raises(FtlabError, match="not a kernel folder"):
        load_kernel(tmp_path / "nothing")


def test_bad_input(tiny_model, tiny_tokenizer, tmp_path):
    exs = examples(4)
    multi = TaskSpec(name="multi", template="{text} It was", options=[" good", " wonderfully"])
    with pytest.raises(FtlabError, match="several tokens long"):
        compute_kernel(tiny_model, tiny_tokenizer, multi, exs, [], KernelSpec(params="all"), tmp_path / "a")
    with pytest.raises(FtlabError, match="no LoRA matrices"):
        select_parameters(tiny_model, "lora")
    with pytest.raises(FtlabError, match="match no parameter"):
        select_parameters(tiny_model, "re:nope")
    with pytest.raises(FtlabError, match="use a projection"):
        compute_kernel(tiny_model, tiny_tokenizer, SPEC, exs, [], KernelSpec(params="all", max_block_mb=0.01),
                       tmp_path / "b", progress=False)
    with pytest.raises(FtlabError, match="output"):
        KernelSpec(output="probs")
    with pytest.raises(FtlabError, match="max_padding"):
        KernelSpec(max_padding=-0.5)


def test_lora_kernel_has_zero_a_gradients_at_init(tiny_model, tiny_tokenizer, tmp_path):
    """peft initialises B = 0, so only the B matrices contribute: the kernel over LoRA params
    equals the kernel over the B matrices alone."""
    from ftlab.models import apply_lora

    model = apply_lora(tiny_model.double())
    exs = examples(4)
    both = compute_kernel(model, tiny_tokenizer, SPEC, exs, [], KernelSpec(params="lora"), tmp_path / "a",
                          progress=False)
    b_only = compute_kernel(model, tiny_tokenizer, SPEC, exs, [], KernelSpec(params=r"re:lora_B"), tmp_path / "b",
                            progress=False)
    torch.testing.assert_close(both.tensors["sgd"], b_only.tensors["sgd"])
    assert both.tensors["sgd"].abs().max() > 0


@pytest.mark.parametrize("size,max_padding", [(4, 0.1), (3, 0.0), (16, 0.5)])
def test_length_chunks_bound_padding_and_are_maximal(size, max_padding):
    lengths = sorted(torch.randint(5, 200, (60,), generator=torch.Generator().manual_seed(size)).tolist())
    chunks = length_chunks(lengths, size, max_padding)
    assert [s for s, _ in chunks] == [0] + [e for _, e in chunks[:-1]] and chunks[-1][1] == len(lengths)

    def padded_ok(s, e):
        return (e - s) * max(lengths[s:e]) <= (1 + max_padding) * sum(lengths[s:e])
    for s, e in chunks:
        assert e - s <= size and (e - s == 1 or padded_ok(s, e))
        if e < len(lengths) and e - s < size:  # one more row would have broken the bound
            assert not padded_ok(s, e + 1)
    assert length_chunks([], size, max_padding) == []
    assert length_chunks([7] * 10, 4, 0.0) == [(0, 4), (4, 8), (8, 10)]


def test_row_plan_sorts_each_part_and_keeps_chunks_inside_it(tiny_tokenizer):
    exs = examples()
    train, test = exs[:5], exs[5:]
    encoder = Encoder(tiny_tokenizer, SPEC)
    plan = plan_rows(encoder, train, test, 3, 0.0)
    assert sorted(plan.train_order) == list(range(5)) and sorted(plan.test_order) == list(range(len(test)))
    assert plan.rows == [train[i] for i in plan.train_order] + [test[i] for i in plan.test_order]
    # lengths as the encoder pads them: the attention mask of each row alone
    assert plan.lengths == [int(encode_rows(encoder, [ex]).attention_mask.sum()) for ex in plan.rows]
    assert plan.lengths[:5] == sorted(plan.lengths[:5]) and plan.lengths[5:] == sorted(plan.lengths[5:])
    assert all(e <= 5 or s >= 5 for s, e in plan.chunks)
    assert [i for s, e in plan.chunks for i in range(s, e)] == list(range(len(exs)))
