"""The Quad objective (Saunshi et al. 2021) against its formula, finite differences, its minimiser,
and through the training loop."""

import pytest
import torch

from ftlab import objectives
from ftlab.config import TrainConfig, load_config
from ftlab.errors import FtlabError
from ftlab.objectives import Encoder
from ftlab.tasks.base import Example, TaskSpec


def _paper(f, phi, w):
    """l_quad for one (s, w): -f(s)^T phi_w + 1/2 ||Phi^T f(s)||^2, phi = d x V (columns phi_w)."""
    return -f @ phi[:, w] + 0.5 * (phi.T @ f).pow(2).sum()


def test_quad_loss_is_the_formula_and_its_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    d, V, n = 5, 11, 4
    phi = torch.randn(d, V, generator=g, dtype=torch.float64)
    f = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([3, 0, 10, 3])
    got = objectives.quad_loss(f @ phi, w)
    want = torch.stack([_paper(f[i], phi, w[i]) for i in range(n)]).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(got, f)
    # analytic: d/df = (Phi Phi^T f - phi_w) / n
    analytic = ((phi @ (phi.T @ f.detach().T)).T - phi[:, w].T) / n
    torch.testing.assert_close(grad, analytic, rtol=1e-12, atol=1e-12)
    eps, fd = 1e-6, torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(n):
            for j in range(d):
                e = torch.zeros_like(f)
                e[i, j] = eps
                fd[i, j] = (objectives.quad_loss((f + e) @ phi, w) - objectives.quad_loss((f - e) @ phi, w)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_quad_minimiser_is_linear_in_phi_p():
    """E_{w~p}[l_quad] is minimised at f* = (Phi Phi^T)^-1 Phi p (the paper's point: optimal Quad
    features are a linear function of Phi p*): the expected gradient vanishes there, not at Phi p."""
    g = torch.Generator().manual_seed(1)
    d, V = 4, 9
    phi = torch.randn(d, V, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)

    def expected(f):
        return sum(p[w] * objectives.quad_loss((f @ phi)[None], torch.tensor([w])) for w in range(V))

    f_star = torch.linalg.solve(phi @ phi.T, phi @ p).requires_grad_(True)
    (grad,) = torch.autograd.grad(expected(f_star), f_star)
    assert grad.abs().max() < 1e-12
    other = (phi @ p).clone().requires_grad_(True)
    assert torch.autograd.grad(expected(other), other)[0].abs().max() > 1e-3


def test_quad_through_objective_fn_on_a_model(tiny_model, tiny_tokenizer):
    model = tiny_model.double()
    lm = TaskSpec(name="lm", template="{start}", metric="f1")
    exs = [Example(id="a", fields={"start": "The"}, answers=("movie was great",)),
           Example(id="b", fields={"start": "A"}, answers=("terrible boring film and a bad plot",))]
    enc = Encoder(tiny_tokenizer, lm)
    got = objectives.objective_fn("quad", model, tiny_tokenizer, enc, exs, torch.device("cpu"))()
    ref = []
    with torch.no_grad():
        for ex in exs:
            p = tiny_tokenizer(lm.prompt(ex))["input_ids"]
            t = tiny_tokenizer(lm.target(ex) + objectives.ANSWER_END, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
            z = logits[len(p) - 1:len(p) - 1 + len(t)]  # positions predicting each target token
            ref.append(torch.stack([-z[j, tok] + 0.5 * z[j].pow(2).sum() for j, tok in enumerate(t)]).mean())
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-9)
    # classification: the gold label word is the next word
    cls = TaskSpec(name="c", template="{text} It was", options=[" terrible", " great"])
    cexs = [Example(id="c0", fields={"text": "great film"}, label=1), Example(id="c1", fields={"text": "bad"}, label=0)]
    got = objectives.objective_fn("quad", model, tiny_tokenizer, Encoder(tiny_tokenizer, cls), cexs, "cpu")()
    with torch.no_grad():
        ref = []
        for ex in cexs:
            z = model(input_ids=torch.tensor([tiny_tokenizer(cls.prompt(ex))["input_ids"]])).logits[0, -1]
            w = tiny_tokenizer(cls.options[ex.label], add_special_tokens=False)["input_ids"][0]
            ref.append(-z[w] + 0.5 * z.pow(2).sum())
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-9)
    multi = TaskSpec(name="m", template="{text} It was", options=[" not good at all", " great"])
    with pytest.raises(FtlabError, match="single-token label words"):
        objectives.objective_fn("quad", model, tiny_tokenizer, Encoder(tiny_tokenizer, multi), cexs, "cpu")()


def test_config_accepts_quad_with_first_order_optimizers():
    assert load_config(TrainConfig, None, ["objective=quad", "optimizer=adamw"]).objective == "quad"
    with pytest.raises(FtlabError, match="has no gradient"):
        load_config(TrainConfig, None, ["objective=accuracy", "optimizer=adamw"])


def test_training_with_quad_lowers_the_quad_loss(tmp_path, tiny_model, tiny_tokenizer):
    from ftlab.tasks.splits import Splits
    from ftlab.train import RunData, train

    lm = TaskSpec(name="lm", template="{start}", metric="f1")
    exs = [Example(id=f"x{i}", fields={"start": "The"}, answers=(s,))
           for i, s in enumerate(["movie was great", "film was terrible", "story was good", "plot was bad"])]
    cfg = load_config(TrainConfig, None, ["objective=quad", "optimizer=adamw", "lr=3e-3", "steps=15",
                                          "batch_size=4", "eval_every=0", "checkpoint_every=0",
                                          f"output_dir={tmp_path / 'run'}"])
    losses = []
    train(cfg, progress=False, model_and_tokenizer=(tiny_model, tiny_tokenizer),
          data=RunData(lm, Splits(train=exs, dev=[], test=[])), callback=lambda s, r: losses.append(r["loss"]))
    assert losses[-1] < 0.5 * losses[0]
