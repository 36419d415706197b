"""The kernel view of prompt-based fine-tuning (Malladi et al., 2023): empirical NTKs (SGD and
sign kernels) of the label-word logits, kernel solvers, and kernel-regime diagnostics.

``entk`` computes kernels into resumable folders (``store``) from the label-word outputs of
``outputs``, the per-example Jacobians of ``jacobians`` and the row chunks of ``chunks``;
``solvers`` turns them into predictions, ``diagnostics`` compares them with real fine-tuning,
``plots`` draws them, ``config`` holds the ``ftlab kernel`` settings.
"""

from ftlab.kernel.entk import KernelSpec, compute_kernel
from ftlab.kernel.outputs import readout_accuracy, readout_matrix, select_parameters
from ftlab.kernel.store import KernelData, load_kernel

__all__ = ["KernelSpec", "compute_kernel", "readout_accuracy", "readout_matrix", "select_parameters", "KernelData",
           "load_kernel"]
