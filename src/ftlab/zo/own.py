"""LowRankFZOO (``optimizer=lowrank-fzoo``): ftlab's own zeroth-order estimator, combining what
works in the implemented ones -- LOZO's low-rank perturbations with lazily refreshed V, FZOO's N
one-sided estimates normalised by the spread of the perturbed losses, and LOZO-M's momentum kept
in the low-rank space.

One step t (subspace k = t // nu, N = n_perturbations seeds s_1..s_N drawn from the optimizer's
generator); for each 2-D weight W (m x n), 1-D tensors use MeZO's z instead of U V^T::

    if t = k nu and k > 0:                                   # lazy V refresh        [LOZO-M]
        V_k = factor(subspace_seed(seed, k));  M <- M V_{k-1}^T V_k / n
    U_i = factor(s_i) (m x r), Z_i = U_i V_k^T                # low-rank directions   [LOZO]
    L0 = loss(theta);  L_i = loss(theta + eps Z_i)            # N + 1 forwards        [FZOO]
    d_i = L_i - L0;  d, L0 = mean over data-parallel ranks    # one all-reduce        [MeZO]
    sigma = std(d_1..d_N)                                     # sample std            [FZOO]
    g_i = float32(d_i / sigma)                                # logged: replay needs nothing else
    M <- beta M + (1 - beta) (1/N) sum_i g_i U_i              # momentum in r dims    [LOZO-M]
    W <- (W - eps Z_N) (1 - lr wd) - (lr / r) M V_k^T         # restore fused with decay, update

Where each part comes from:

* low-rank ``U V^T`` perturbations, V resampled every ``refresh_every`` steps, and momentum
  ``M`` (m x r) carried into each new subspace: LOZO / LOZO-M (Chen et al., ICLR 2025,
  :mod:`ftlab.zo.lozo`). The estimate lives in an r-dimensional row space for nu steps, which
  a fine-tuning gradient (low rank in practice) is well served by; M costs ``r m`` floats per
  matrix instead of ``m n``.
* one-sided estimates at a shared L0 and the division by ``sigma``: FZOO (Dang et al., ICLR
  2026, :mod:`ftlab.zo.fzoo`). Since ``d_i ~ eps <G, Z_i>`` and sigma is their spread, ``g_i``
  is ``<G, Z_i>`` over its own scale: the step is scale-free (no eps, no gradient norm in it),
  an Adam-sized lr works, and a step with exploding losses is not exploding in size. N + 1
  forwards give N estimates (central differences: 2N).
* seed trick, in-place or exact-mode moves, data parallelism, trajectory log: MeZO (Malladi et
  al., 2023, :mod:`ftlab.zo.mezo`).

The class is the composition ``LowRankFZOO(LOZOM, FZOO)``: FZOO's step (:func:`ftlab.zo.fzoo.fzoo`:
the losses, sigma, the logged g) calls LOZO-M's moves (``_apply``, ``perturbed``, ``_update``,
``_refresh``). As in FZOO the normalisation is folded into the logged ``g_i``, so a replay is
LOZO-M's, bit for bit (V refreshes and momentum included), from ``(seeds, g, lr)`` alone.
``momentum=0`` turns the momentum off (``M`` is then this step's estimate only); ``batched=True``
evaluates the N + 1 points in one vmapped forward (LoRA / prefix, :mod:`ftlab.zo.batched`),
perturbing each adapter matrix by ``U V^T`` out of place.

**Cost: N + 1 forwards a step** (batched: one forward of N + 1 copies of the batch).
**Extra memory** (m x n matrices, b bytes per entry): ``V`` ``r n b`` kept, the step's ``U``s
``N r m b``, momentum ``r m`` float32, at most three ``r m`` temporaries in the update; each
1-D tensor a float32 momentum buffer. ``extra_bytes_per_entry`` and :meth:`cost` state the
total (e.g. about ``r (N + 5) / n`` bytes per entry of a square float32 matrix, against
LOZO-M's and MeZO's 0 for full fine-tuning of large matrices).
"""

from __future__ import annotations

from typing import Any, Iterable

from ftlab.errors import FtlabError
from ftlab.zo.fzoo import FZOO
from ftlab.zo.lozo import LOZOM


class LowRankFZOO(LOZOM, FZOO):
    """FZOO's normalised one-sided estimates along LOZO's low-rank directions, with LOZO-M's
    low-rank momentum (see the module docstring). **N + 1 forwards a step**; extra memory: the
    rank-r factors and momentum (:meth:`extra_bytes`).

    Args:
        params, lr, eps, weight_decay, generator, seed, chunk_size, exact: as :class:`MeZO`
            (``lr`` Adam-sized: the step is normalised).
        n_perturbations: N >= 2 (sigma is the sample std of N losses).
        distribution: of U, V (and of 1-D tensors' z): ``"rademacher"`` (default) or ``"gaussian"``.
        rank, refresh_every: r and nu, as :class:`LOZO`.
        momentum: beta in [0, 1), as :class:`LOZOM` (0: no momentum).
        batched: as :class:`FZOO`.
    """

    def __init__(self, params: Iterable, n_perturbations: int = 8, momentum: float = 0.9, **kwargs: Any) -> None:
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) or n_perturbations < 2:
            raise FtlabError(f"LowRankFZOO needs n_perturbations >= 2 (sigma is the std of N perturbed "
                             f"losses; got {n_perturbations})")
        super().__init__(params, n_perturbations=n_perturbations, momentum=momentum, **kwargs)

    def cost(self) -> str:
        forwards = (f"1 batched forward of {self.n + 1} copies of the batch" if self.batched
                    else f"{self.forwards_per_step} forwards")
        return (f"{type(self).__name__}: {forwards} a step, {self.extra_bytes()} extra bytes "
                f"({self.extra_bytes_per_entry} per trainable entry; rank {self.rank} factors and momentum)")
