import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.tint.construct import (
    LinearBackward,
    LinearDescent,
    LinearForward,
    LossGradient,
    RMSNormBackward,
    SelfAttentionBackward,
    SelfAttentionForward,
    SwiGLUBackward,
    TintConfig,
    TintState,
    build_tint,
    prefix_layout,
)
from ftlab.tint.inner import forward as inner_forward
from ftlab.tint.inner import inner_from_hf, layer_forward
from ftlab.tint.reference import (
    Approximations,
    _jvp_rms,
    _jvp_silu,
    approximate_step,
    loss_gradient,
    whole_context_mask,
)

from tint_helpers import tiny_llama

G = torch.Generator().manual_seed(0)
P, DOUT, DIN, T = 8, 24, 16, 10


def _rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def _bank(w, width=None):
    emb = torch.zeros(P, width or w.numel() // P, dtype=w.dtype)
    emb[:, : w.numel() // P] = w.reshape(P, -1)
    return emb


def _state(prefix=None, n_train=T, **stream):
    return TintState(dict(prefix or {}), dict(stream), n_train)


def test_linear_forward_is_attention_to_prefix_rows():
    w, x = _rand(DOUT, DIN), _rand(T, DIN)
    s = LinearForward("W", DOUT, DIN, P, "x", "y")(_state({"W": _bank(w, 64)}, x=x))
    torch.testing.assert_close(s.stream["y"], x @ w.T, rtol=0, atol=1e-12)


def test_linear_backward_reads_rows_by_gradient():
    w, dy, old = _rand(DOUT, DIN), _rand(T, DOUT), _rand(T, DIN)
    s = LinearBackward("W", DOUT, DIN, P, "dy", "dx", add=True)(_state({"W": _bank(w)}, dy=dy, dx=old))
    torch.testing.assert_close(s.stream["dx"], old + dy @ w, rtol=0, atol=1e-12)


def test_linear_descent_updates_prefixes_from_training_tokens_only():
    w, dy, x = _rand(DOUT, DIN), _rand(T, DOUT), _rand(T, DIN)
    s = LinearDescent("W", DOUT, DIN, P, "dy", "x", 0.1)(_state({"W": _bank(w, 64)}, n_train=6, dy=dy, x=x))
    new = s.prefix["W"]
    torch.testing.assert_close(new[:, : DOUT * DIN // P].reshape(DOUT, DIN), w - 0.1 * dy[:6].T @ x[:6],
                               rtol=0, atol=1e-12)
    assert float(new[:, DOUT * DIN // P:].abs().max()) == 0.0  # padding untouched


def test_norm_and_gate_backward_are_the_finite_differences(tiny_inner):
    x, g, u, gain = _rand(T, 32), _rand(T, 32), _rand(T, 32), _rand(32)
    s = RMSNormBackward("x", "g", "acc", gain, 1e-6, 10.0)(_state(x=x, g=g, acc=torch.zeros(T, 32, dtype=x.dtype)))
    torch.testing.assert_close(s.stream["acc"], _jvp_rms(x, gain * g, 1e-6, 10.0), rtol=0, atol=1e-12)
    s = SwiGLUBackward("g", "u", "dm", "dg", "du", 10.0)(_state(g=g, u=u, dm=x))
    torch.testing.assert_close(s.stream["dg"], _jvp_silu(g, x * u, 10.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.stream["du"], x * torch.nn.functional.silu(g), rtol=0, atol=1e-12)


def test_attention_forward_and_stop_gradient_backward(tiny_inner):
    spec, layer = tiny_inner.spec, tiny_inner.layers[0]
    h = _rand(T, spec.hidden)
    cos, sin = tiny_inner.rotary(torch.arange(T), torch.float64)
    _, c = layer_forward(spec, layer, h, cos, sin)
    x1 = c.x1
    s = _state(q=x1 @ layer.w["q"].T, k=x1 @ layer.w["k"].T, v=x1 @ layer.w["v"].T)
    s = SelfAttentionForward(spec.n_heads, spec.n_kv_heads, spec.head_dim, "q", "k", "v", "o", "att", tiny_inner)(s)
    torch.testing.assert_close(s.stream["o"], c.o, rtol=0, atol=1e-12)
    do = _rand(T, spec.n_heads * spec.head_dim)
    s.stream["do"] = do
    s = SelfAttentionBackward(spec.n_heads, spec.n_kv_heads, spec.head_dim, "att", "do", "dv")(s)
    dvv = c.a.transpose(-1, -2) @ do.view(T, spec.n_heads, -1).transpose(0, 1)
    want = dvv.view(spec.n_kv_heads, spec.group, T, -1).sum(1).transpose(0, 1).reshape(T, -1)
    torch.testing.assert_close(s.stream["dv"], want, rtol=0, atol=1e-12)


def test_loss_gradient_is_E_p_minus_q(tiny_inner, sequence):
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    h = _rand(len(ids), tiny_inner.spec.hidden)
    s = _state(h=h, target_embedding=tiny_inner.lm_head[ids])
    s = LossGradient(tiny_inner, "h", "grad", 50.0)(s, mask)
    dlogits, _ = loss_gradient(tiny_inner, h, ids, mask, mean=False)
    want = _jvp_rms(h, tiny_inner.norm * (dlogits @ tiny_inner.lm_head), tiny_inner.spec.eps, 50.0)
    torch.testing.assert_close(s.stream["grad"], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,tied,n_prefixes", [(1, False, 16), (2, True, 8), (3, False, 4)])
def test_one_forward_pass_equals_the_reference_step(k, tied, n_prefixes, sequence):
    inner = inner_from_hf(tiny_llama(seed=k, tied=tied))
    ids, n_train = sequence
    mask = whole_context_mask(ids, n_train)
    mask[:5] = False
    cfg = TintConfig(n_prefixes=n_prefixes, k=k, inner_lr=0.05, finite_diff_n=100.0)
    got = build_tint(inner, cfg)(ids, n_train, mask)
    ref = approximate_step(inner, ids, n_train, mask, k, 0.05, Approximations(True, 100.0, True))
    torch.testing.assert_close(got, ref.test_logits, rtol=0, atol=1e-10)
    base, _ = inner_forward(inner, ids)
    assert float((got - base[n_train:]).abs().max()) > 1e-3  # the step changed the test logits


def test_zero_lr_tint_is_the_inner_model(tiny_inner, sequence):
    ids, n_train = sequence
    got = build_tint(tiny_inner, TintConfig(n_prefixes=16, k=2, inner_lr=0.0))(ids, n_train,
                                                                                  whole_context_mask(ids, n_train))
    base, _ = inner_forward(tiny_inner, ids)
    torch.testing.assert_close(got, base[n_train:], rtol=0, atol=1e-12)


def test_bad_layouts_and_contexts(tiny_inner, sequence):
    need, rows = prefix_layout(tiny_inner, TintConfig(n_prefixes=16))
    assert need == 128 and rows["gate"] == 4  # 64 rows of 32 over 16 prefixes; down: 2 rows of 64
    with pytest.raises(FtlabError, match=r"hidden_size=100 cannot hold .* >= 128"):
        build_tint(tiny_inner, TintConfig(n_prefixes=16, hidden_size=100))
    with pytest.raises(FtlabError, match="does not divide"):
        build_tint(tiny_inner, TintConfig(n_prefixes=5))
    with pytest.raises(FtlabError, match="exceeds"):
        build_tint(tiny_inner, TintConfig(n_prefixes=16, k=4))
    with pytest.raises(FtlabError, match="n_prefixes"):
        TintConfig(n_prefixes=0)
    ids, _ = sequence
    tint = build_tint(tiny_inner, TintConfig(n_prefixes=16))
    with pytest.raises(FtlabError, match="no training part"):
        tint(ids, 0, torch.zeros_like(ids, dtype=torch.bool))


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(FtlabError, match="GPT-2/OPT"):
        build_tint(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)), TintConfig())


@pytest.mark.slow
def test_smollm2_top_layers_float32(smollm2):
    model, tokenizer = smollm2
    inner = inner_from_hf(model, torch.float32)
    inner.layers = inner.layers[-3:]          # SmolLM2's top three layers (with its embeddings and head)
    inner.spec.n_layers = 3
    ids = torch.tensor(tokenizer("The movie was great. It was positive. The film was dull. It was")["input_ids"])
    n_train = 10
    mask = whole_context_mask(ids, n_train)
    tint = build_tint(inner, TintConfig(n_prefixes=64, k=2, inner_lr=1e-3, finite_diff_n=100.0))
    got = tint(ids, n_train, mask)
    ref = approximate_step(inner, ids, n_train, mask, 2, 1e-3, Approximations(True, 100.0, True))
    scale = float(ref.test_logits.abs().max())
    assert float((got - ref.test_logits).abs().max()) < 1e-4 * scale
    assert got.argmax(-1).tolist() == ref.test_logits.argmax(-1).tolist()
