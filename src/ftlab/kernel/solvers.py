"""Predictions from a kernel: kernel regression with the ``f0`` offset, kernel SVM and kernel
logistic regression.

Regression solves the whole ``O``-output problem on the flattened ``(N*O, N*O)`` kernel, which is
exactly what gradient flow on the squared loss of the *linearised* model converges to
(Malladi et al., 2023, Thm 3.3; with the sign kernel, SignGD's asymmetric counterpart):

    f(x) = f0(x) + K(x, X) (K(X, X) + lambda ||K(X, X)||_2 I)^-1 (Y - f0(X)),

with targets ``Y`` the unit-norm readout rows of the labels (one-hot for ``output="logits"``,
``+-1`` for two classes with ``output="contrast"``). The class is the argmax of ``R f(x)``.

SVM and logistic regression use scikit-learn with a *scalar* kernel built from the ``O x O``
blocks: their trace, ``k(x, x') = sum_o K_oo(x, x')`` (the kernel of the concatenated output
gradients; for two classes with ``output="contrast"`` it is the paper's binary kernel).
scikit-learn handles the classes (one-vs-one SVM, multinomial logistic). The SVM gets the
train x train trace kernel as its Gram matrix (for the asymmetric sign kernel that matrix is
not symmetric; libsvm uses it as given), logistic regression the kernel rows ``k(x, X)`` as
features. Neither uses ``f0``.

A singular or ill-conditioned regression system (condition number above ``1 / (1e3 eps)``)
falls back to the smallest relative ridge in ``1e-10, 1e-9, ..., 1e-2`` that makes it well
conditioned; the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.kernel.store import KernelData

METHODS = ("regression", "svm", "logistic")
_FALLBACK_RIDGES = tuple(10.0 ** -k for k in range(10, 1, -1))


@dataclass
class Solution:
    """Predicted classes and outputs of one solver on the test rows.

    ``outputs`` are class scores ``(M, C)`` (regression: ``R f``; SVM: decision values;
    logistic: log-probabilities). ``ridge`` is the relative ridge actually used; ``note``
    reports a fallback."""

    method: str
    kind: str
    predictions: list[int]
    outputs: Tensor
    accuracy: float | None
    ridge: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def targets(labels: Tensor, readout: Tensor) -> Tensor:
    """Regression targets ``(N, O)``: the label's readout row scaled to unit norm."""
    rows = readout[labels.long()]
    return rows / rows.norm(dim=1, keepdim=True)


def flatten_blocks(blocks: Tensor) -> Tensor:
    """``(A, B, O, O)`` blocks -> ``(A*O, B*O)`` matrix with row ``(a, o)``, column ``(b, q)``."""
    a, b, o, q = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(a * o, b * q)


def _condition_limit(dtype: torch.dtype) -> float:
    return 1.0 / (1e3 * torch.finfo(dtype).eps)


def regularised_solve(matrix: Tensor, rhs: Tensor, ridge: float = 0.0) -> tuple[Tensor, float, str]:
    """Solve ``(A + ridge ||A||_2 I) x = b`` in float64; with ``ridge == 0`` a singular or
    ill-conditioned ``A`` falls back to the smallest sufficient ridge. Returns ``(x, ridge, note)``."""
    a = matrix.double()
    scale = torch.linalg.matrix_norm(a, ord=2)
    if not torch.isfinite(a).all() or scale == 0:
        raise FtlabError("the kernel matrix is zero or not finite; check the parameter subset (e.g. LoRA "
                         "A matrices have zero gradient at initialisation) and the model outputs")
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    note = ""
    if ridge == 0:
        cond = float(torch.linalg.cond(a))
        if not np.isfinite(cond) or cond > _condition_limit(a.dtype):
            for r in _FALLBACK_RIDGES:
                if float(torch.linalg.cond(a + r * scale * eye)) <= _condition_limit(a.dtype):
                    ridge = r
                    break
            else:
                ridge = _FALLBACK_RIDGES[-1]
            note = f"singular or ill-conditioned kernel (cond={cond:.2g}): ridge {ridge:g}*||K|| added"
    return torch.linalg.solve(a + ridge * scale * eye, rhs.double()), ridge, note


def kernel_regression(k_train: Tensor, k_test: Tensor, f0_train: Tensor, f0_test: Tensor, y: Tensor,
                      ridge: float = 0.0) -> tuple[Tensor, float, str]:
    """Outputs ``(M, O)`` of kernel regression with offset ``f0`` and targets ``y`` ``(N, O)``.

    ``k_train`` is ``(N, N, O, O)``, ``k_test`` ``(M, N, O, O)``. Returns ``(outputs, ridge, note)``."""
    n, o = f0_train.shape
    if k_train.shape != (n, n, o, o) or k_test.shape[1:] != (n, o, o) or y.shape != (n, o):
        raise FtlabError(f"kernel shapes do not fit: train {tuple(k_train.shape)}, test {tuple(k_test.shape)}, "
                         f"f0 {tuple(f0_train.shape)}, targets {tuple(y.shape)}")
    residual = (y.double() - f0_train.double()).reshape(n * o)
    alpha, used, note = regularised_solve(flatten_blocks(k_train), residual, ridge)
    out = f0_test.double() + (flatten_blocks(k_test).double() @ alpha).view(-1, o)
    return out, used, note


def trace_kernel(blocks: Tensor) -> Tensor:
    """The scalar kernel ``sum_o K_oo`` of ``(A, B, O, O)`` blocks, ``(A, B)``."""
    return torch.diagonal(blocks, dim1=2, dim2=3).sum(-1)


def _accuracy(pred: list[int], labels: Tensor | None) -> float | None:
    if labels is None or (labels < 0).any():
        return None
    return float((torch.tensor(pred) == labels).double().mean())


def solve(kernel: KernelData, method: str = "regression", kind: str = "sgd", *, ridge: float = 0.0,
          c: float = 1.0, seed: int = 0) -> Solution:
    """Fit ``method`` on the train rows of ``kernel`` (kind ``"sgd"`` or ``"sign"``) and predict
    the test rows. ``ridge`` is the relative ridge of regression, ``c`` the inverse
    regularisation of SVM / logistic regression, ``seed`` their random state."""
    if method not in METHODS:
        raise FtlabError(f"unknown kernel solver {method!r}; choose one of {', '.join(METHODS)}")
    if not kernel.manifest["test_ids"]:
        raise FtlabError("the kernel has no test rows to predict; compute it with test examples")
    y_train, y_test = kernel.y_train, kernel.y_test
    readout = kernel.tensors["readout"].double()
    if len(set(y_train.tolist())) < 2:
        raise FtlabError("the training examples cover fewer than two classes; a classifier needs both")
    if method == "regression":
        out, used, note = kernel_regression(kernel.train(kind), kernel.test(kind), kernel.f0_train,
                                            kernel.f0_test, targets(y_train, readout), ridge)
        scores = out @ readout.T
        pred = scores.argmax(1).tolist()
        return Solution(method, kind, pred, scores, _accuracy(pred, y_test), used, note)
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    gram = trace_kernel(kernel.train(kind)).numpy()
    rows = trace_kernel(kernel.test(kind)).numpy()
    if method == "svm":
        model = SVC(kernel="precomputed", C=c, random_state=seed).fit(gram, y_train.numpy())
        scores = torch.as_tensor(model.decision_function(rows), dtype=torch.float64)
    else:
        # Kernel rows as features, standardised by the training Gram's scale (lbfgs converges).
        scale = float(np.abs(gram).max()) or 1.0
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(gram / scale, y_train.numpy())
        scores = torch.as_tensor(model.predict_log_proba(rows / scale), dtype=torch.float64)
    pred = [int(p) for p in model.predict(rows if method == "svm" else rows / scale)]
    return Solution(method, kind, pred, scores.reshape(len(pred), -1), _accuracy(pred, y_test))
