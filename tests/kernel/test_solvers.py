"""Kernel solvers: the linearised model trained to convergence, closed forms, independent
scikit-learn references on explicit features, and the singular-system fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.kernel import KernelData, KernelSpec, compute_kernel, readout_matrix, select_parameters
from ftlab.kernel.solvers import kernel_regression, regularised_solve, solve, targets, trace_kernel

from kernel_helpers import SPEC, examples, explicit_jacobians


def synthetic(n_train=6, n_test=5, n_classes=3, output="logits", dim=40, seed=0, jac=None):
    """A KernelData built from explicit random Jacobians (R, O, P), plus those Jacobians."""
    g = torch.Generator().manual_seed(seed)
    readout = readout_matrix(n_classes, output)
    n_out = readout.shape[1]
    jac = torch.randn(n_train + n_test, n_out, dim, generator=g, dtype=torch.float64) if jac is None else jac
    f0 = torch.randn(n_train + n_test, n_out, generator=g, dtype=torch.float64)
    labels = [i % n_classes for i in range(n_train + n_test)]
    manifest = {"train_ids": [f"a{i}" for i in range(n_train)], "test_ids": [f"b{i}" for i in range(n_test)],
                "train_labels": labels[:n_train], "test_labels": labels[n_train:]}
    tensors = {"sgd": torch.einsum("aop,bqp->aboq", jac, jac[:n_train]),
               "sign": torch.einsum("aop,bqp->aboq", jac, torch.sign(jac[:n_train])), "f0": f0, "readout": readout}
    return KernelData(manifest, tensors), jac


def test_kernel_regression_equals_linearised_model_trained_to_convergence(gpt2_64, tiny_tokenizer, tmp_path):
    """Gradient descent with a small lr on the squared loss of f0 + J (theta - theta0), from
    theta0, converges to the kernel regression solution (min-norm interpolant)."""
    exs = examples()
    kspec = KernelSpec(params=r"re:ln_f\.", output="contrast")  # 128 entries, 8 outputs: cond(K) ~ 25
    kd = compute_kernel(gpt2_64, tiny_tokenizer, SPEC, exs[:4], exs[4:], kspec, tmp_path / "k", progress=False)
    readout = readout_matrix(3, "contrast")
    jac = explicit_jacobians(gpt2_64, tiny_tokenizer, SPEC, exs, select_parameters(gpt2_64, kspec.params), readout)
    j_train, j_test = jac[:4].reshape(8, -1), jac[4:].reshape(8, -1)
    y = targets(kd.y_train, readout).reshape(-1)
    f0_train, f0_test = kd.f0_train.reshape(-1), kd.f0_test.reshape(-1)
    delta = torch.zeros(j_train.shape[1], dtype=torch.float64)
    lr = 1.0 / torch.linalg.matrix_norm(j_train, ord=2) ** 2  # small enough: below 2 / lambda_max
    j_t = j_train.T.contiguous()
    for _ in range(5000):
        delta -= lr * j_t @ (f0_train + j_train @ delta - y)
    assert (f0_train + j_train @ delta - y).abs().max() < 1e-9  # trained to convergence
    linearised = (f0_test + j_test @ delta).view(4, 2)
    out, ridge, note = kernel_regression(kd.train("sgd"), kd.test("sgd"), kd.f0_train, kd.f0_test,
                                         targets(kd.y_train, readout))
    torch.testing.assert_close(out, linearised, rtol=1e-7, atol=1e-7)
    assert ridge == 0 and note == ""


@pytest.mark.parametrize("output", ["logits", "contrast"])
@pytest.mark.parametrize("kind", ["sgd", "sign"])
def test_regression_closed_form_with_ridge(output, kind):
    kd, _ = synthetic(output=output)
    n, o = kd.f0_train.shape
    sol = solve(kd, "regression", kind, ridge=0.1)
    # Independent reference in numpy: flatten row (i, o) / column (j, q) by hand.
    k_tr = kd.train(kind).numpy()
    a = np.zeros((n * o, n * o))
    for i in range(n):
        for j in range(n):
            a[i * o:(i + 1) * o, j * o:(j + 1) * o] = k_tr[i, j]
    k_te = kd.test(kind).numpy()
    b = np.concatenate([np.concatenate(list(k_te[m]), axis=1) for m in range(k_te.shape[0])], axis=0)
    readout = kd.tensors["readout"].numpy()
    y = readout[kd.y_train.numpy()]
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    alpha = np.linalg.solve(a + 0.1 * np.linalg.norm(a, 2) * np.eye(n * o), (y - kd.f0_train.numpy()).reshape(-1))
    expected = (kd.f0_test.numpy() + (b @ alpha).reshape(-1, o)) @ readout.T
    np.testing.assert_allclose(sol.outputs.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert sol.predictions == expected.argmax(1).tolist()
    assert sol.accuracy == pytest.approx(np.mean(expected.argmax(1) == kd.y_test.numpy()))
    assert sol.ridge == 0.1


def test_targets_are_one_hot_or_plus_minus_one():
    labels = torch.tensor([0, 1, 1])
    torch.testing.assert_close(targets(labels, readout_matrix(2, "logits")), torch.eye(2, dtype=torch.float64)[labels])
    contrast = targets(labels, readout_matrix(2, "contrast"))
    assert contrast.shape == (3, 1)
    assert contrast[:, 0].tolist() == pytest.approx([-1.0, 1.0, 1.0])
    r = readout_matrix(4, "contrast")
    torch.testing.assert_close(r.T @ r, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(r.sum(0), torch.zeros(3, dtype=torch.float64))


def test_svm_equals_linear_svc_on_explicit_features():
    from sklearn.svm import SVC

    kd, jac = synthetic()
    sol = solve(kd, "svm", "sgd", c=0.5)
    feats = jac.reshape(jac.shape[0], -1).numpy()  # trace kernel = <vec J(x), vec J(x')>
    ref = SVC(kernel="linear", C=0.5).fit(feats[:6], kd.y_train.numpy())
    assert sol.predictions == ref.predict(feats[6:]).tolist()
    np.testing.assert_allclose(sol.outputs.numpy(), ref.decision_function(feats[6:]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trace_kernel(kd.train("sgd")), torch.as_tensor(feats[:6] @ feats[:6].T))


def test_logistic_equals_sklearn_on_kernel_rows():
    from sklearn.linear_model import LogisticRegression

    kd, _ = synthetic()
    sol = solve(kd, "logistic", "sign", c=2.0)
    gram, rows = trace_kernel(kd.train("sign")).numpy(), trace_kernel(kd.test("sign")).numpy()
    scale = np.abs(gram).max()
    ref = LogisticRegression(C=2.0, max_iter=5000).fit(gram / scale, kd.y_train.numpy())
    assert sol.predictions == ref.predict(rows / scale).tolist()
    np.testing.assert_allclose(sol.outputs.numpy(), ref.predict_log_proba(rows / scale), rtol=1e-6, atol=1e-6)


def test_singular_system_falls_back_to_ridge_and_says_so():
    # Fewer parameters (dim=4) than train outputs (6 x 3): K = J J^T has rank 4 < 18.
    kd, _ = synthetic(dim=4)
    sol = solve(kd, "regression", "sgd")
    assert sol.ridge > 0 and "singular or ill-conditioned" in sol.note
    assert np.isfinite(sol.outputs.numpy()).all()
    # The fallback is the ridge solution with that ridge, computed independently.
    direct = solve(kd, "regression", "sgd", ridge=sol.ridge)
    torch.testing.assert_close(sol.outputs, direct.outputs)
    x, r, note = regularised_solve(torch.eye(3, dtype=torch.float64), torch.ones(3))
    assert r == 0 and note == "" and torch.allclose(x, torch.ones(3, dtype=torch.float64))


def test_bad_input():
    kd, _ = synthetic()
    with pytest.raises(FtlabError, match="unknown kernel solver"):
        solve(kd, "ridge")
    with pytest.raises(FtlabError, match="kind"):
        solve(kd, "regression", "adam")
    zero, _ = synthetic(jac=torch.zeros(11, 3, 5, dtype=torch.float64))
    with pytest.raises(FtlabError, match="zero or not finite"):
        solve(zero, "regression")
    one_class, _ = synthetic()
    one_class.manifest["train_labels"] = [0] * 6
    with pytest.raises(FtlabError, match="fewer than two classes"):
        solve(one_class, "svm")
    with pytest.raises(FtlabError, match="shapes do not fit"):
        kernel_regression(kd.train("sgd"), kd.test("sgd")[:, :3], kd.f0_train, kd.f0_test, kd.f0_train)
