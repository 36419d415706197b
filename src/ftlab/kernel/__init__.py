"""The kernel view of prompt-based fine-tuning (Malladi et al., 2023): empirical NTKs (SGD and
sign kernels) of the label-word logits, kernel solvers, and kernel-regime diagnostics.

``entk`` computes kernels into resumable folders (``store``), ``solvers`` turns them into
predictions, ``diagnostics`` compares them with real fine-tuning, ``plots`` draws them.
"""

from ftlab.kernel.entk import KernelSpec, compute_kernel, readout_matrix, select_parameters
from ftlab.kernel.store import KernelData, load_kernel

__all__ = ["KernelSpec", "compute_kernel", "readout_matrix", "select_parameters", "KernelData", "load_kernel"]
