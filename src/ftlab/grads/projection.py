"""Seeded random projections of per-example gradients (LESS step 2), identical on every device.

Two kinds, both Johnson-Lindenstrauss maps ``P: R^D -> R^d`` with ``E[<Px, Py>] = <x, y>``:

- ``"sparse"`` (default): a sparse JL sketch in the block (OSNAP) construction. The ``d``
  outputs are cut into ``s`` blocks of ``d / s``; input coordinate ``j`` adds ``±x_j / sqrt(s)``
  to one hashed output of each block. Cost ``O(s * D)`` per example instead of ``O(d * D)``.
  Its inner-product variance, ``(|x|^2 |y|^2 + <x, y>^2 - 2 sum_j x_j^2 y_j^2) / d``, is never
  above a dense Gaussian map's; only vectors dominated by a few coordinates have heavier tails.
- ``"rademacher"``: a dense ``±1/sqrt(d)`` matrix generated block by block on the fly (never
  stored), for comparison (see ``benchmarks/less_projection.py``: ~1,500x slower on CPU).

Device independence: the sparse sketch's rows and signs come from a counter-based integer hash
of ``(seed, coordinate, block)`` computed with exact int64 arithmetic (no overflow, so CPU and
CUDA agree bit for bit); the dense matrix is drawn by a CPU ``torch.Generator`` seeded per block
of coordinates and moved to the device. Either way row ``i`` of the output depends only on row
``i`` of the input and the spec, so batch size and the split of the input into blocks do not
matter (up to float summation order, ~1e-6 relative).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ftlab.errors import FtlabError

KINDS = ("sparse", "rademacher")
_MASK32 = 0xFFFFFFFF
# Coordinates processed at a time: bounds the temporaries to (chunk x batch) floats. Part of the
# definition of the float summation order, so kept fixed.
_CHUNK = 1 << 20
# Coordinates per independently seeded block of the dense matrix (fixed: part of the definition).
_DENSE_BLOCK = 1024


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything that defines a projection; equal specs give equal features on any device.

    Attributes:
        dim_in: input dimension D (e.g. the number of trainable LoRA entries).
        dim_out: output dimension d (8192 in the LESS paper).
        seed: seed of the random map.
        kind: ``"sparse"`` (sparse JL sketch, default) or ``"rademacher"`` (dense, blocked).
        sparsity: nonzeros per input coordinate ``s`` of the sparse sketch; must divide ``dim_out``.
    """

    dim_in: int
    dim_out: int = 8192
    seed: int = 0
    kind: str = "sparse"
    sparsity: int = 4

    def __post_init__(self) -> None:
        if self.dim_in < 1 or self.dim_out < 1:
            raise FtlabError(f"projection dims must be positive, got dim_in={self.dim_in}, dim_out={self.dim_out}")
        if self.kind not in KINDS:
            raise FtlabError(f"unknown projection kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind == "sparse" and (self.sparsity < 1 or self.dim_out % self.sparsity):
            raise FtlabError(f"projection sparsity={self.sparsity} must be >= 1 and divide "
                             f"dim_out={self.dim_out}; use e.g. sparsity=4 with dim_out=8192")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict (stored in datastore manifests)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProjectionSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer, incompatible spec)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise FtlabError(f"unknown projection spec fields {sorted(unknown)}; was it written by a newer ftlab?")
        return cls(**d)


def _mul32(x: Any, c: int) -> Any:
    """``x * c mod 2^32`` for ``0 <= x < 2^32``, in two 16-bit halves so no product exceeds 2^49
    (int64 tensors never overflow, so every device computes the same bits)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: Any) -> Any:
    """A 32-bit integer mixer (Wellons' ``lowbias32``) on Python ints or int64 tensors in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_key(seed: int, salt: int) -> int:
    """A 32-bit key from an arbitrary (possibly negative or > 32-bit) seed and a salt."""
    seed &= (1 << 64) - 1
    return hash32(hash32((seed & _MASK32) ^ salt) ^ (seed >> 32))


def jl_tolerance(dim_out: int, n_points: int, delta: float = 0.01) -> float:
    """The Johnson-Lindenstrauss error ``eps`` guaranteed with probability ``>= 1 - delta``.

    For a dense Gaussian or Rademacher map to ``d = dim_out`` dims and one vector ``v``,
    ``P(| |Pv|^2 - |v|^2 | > eps |v|^2) <= 2 exp(-d eps^2 / 8)`` for ``eps <= 1/2``. By
    polarisation, ``<x, y> = (|x + y|^2 - |x - y|^2) / 4``, so controlling the norms of the
    ``n`` points and of their ``n (n - 1)`` pairwise sums and differences (``n^2`` vectors in all)
    bounds every inner product: with probability ``>= 1 - delta``, for all pairs ``i, j``

        ``|<Px_i, Px_j> - <x_i, x_j>| <= eps |x_i| |x_j|``  with  ``eps = sqrt(8 ln(2 n^2 / delta) / d)``.

    The sparse sketch has the same (or lower) variance and meets the same bound for well-spread
    vectors (no coordinate carrying a sizeable share of the norm, as for gradients); its worst
    case over adversarial, very sparse inputs needs ``s`` growing with ``1/eps`` (Kane & Nelson, 2014).
    The bound holds only where the returned ``eps <= 1/2``.
    """
    if dim_out < 1 or n_points < 1 or not 0 < delta < 1:
        raise FtlabError(f"jl_tolerance needs dim_out >= 1, n_points >= 1 and 0 < delta < 1, got "
                         f"{dim_out}, {n_points}, {delta}")
    return math.sqrt(8 * math.log(2 * n_points**2 / delta) / dim_out)


class Projector:
    """Applies the projection of a :class:`ProjectionSpec` on ``device``.

    The sparse sketch is built as CSR matrices (one per chunk of 2^20 input coordinates) on first
    use and cached (8 bytes per input coordinate and nonzero: 15 MB for D = 0.46M, s = 4);
    ``cache=False`` rebuilds them on every call instead.
    """

    def __init__(self, spec: ProjectionSpec, device: str | torch.device = "cpu", cache: bool = True):
        self.spec = spec
        self.device = torch.device(device)
        self.cache = cache
        self._tables: dict[tuple[int, int], Tensor] = {}

    def project(self, x: Tensor) -> Tensor:
        """Project ``x`` of shape ``(B, dim_in)`` (any float dtype) to ``(B, dim_out)`` float32."""
        return self.project_blocks([x])

    def project_blocks(self, blocks: Sequence[Tensor]) -> Tensor:
        """Project the concatenation of ``blocks`` (each ``(B, n_i)``, ``sum n_i == dim_in``, e.g. one
        per LoRA parameter) without building it; the result equals ``project(torch.cat(blocks, 1))``
        bit for bit (both walk the same fixed, globally aligned chunks of coordinates)."""
        blocks = [b.reshape(b.shape[0], -1) for b in blocks]
        total = sum(b.shape[1] for b in blocks)
        if not blocks or total != self.spec.dim_in or len({b.shape[0] for b in blocks}) != 1:
            shapes = [tuple(b.shape) for b in blocks]
            raise FtlabError(f"projection expects blocks (B, n_i) with one B and sum n_i = dim_in = "
                             f"{self.spec.dim_in}, got shapes {shapes}")
        # The dense product accumulates in float64: BLAS blocks a product differently for each
        # batch size, and float32 sums of ~1e6 terms would then differ by ~1e-5 relative.
        acc = torch.float32 if self.spec.kind == "sparse" else torch.float64
        out_t = torch.zeros(self.spec.dim_out, blocks[0].shape[0], dtype=acc, device=self.device)
        for start, pieces in _aligned_chunks(blocks, _CHUNK):
            x_t = _transposed(pieces, acc, self.device)
            n = x_t.shape[0]
            if self.spec.kind == "sparse":
                out_t += self._sparse_matrix(start, n) @ x_t
            else:  # one seeded block of the dense matrix at a time (chunks start block-aligned)
                for a in range(0, n, _DENSE_BLOCK):
                    rows = self._dense_rows(start + a, min(_DENSE_BLOCK, n - a))
                    out_t += rows.t() @ x_t[a:a + _DENSE_BLOCK]
        return out_t.t().to(torch.float32).contiguous()

    def _sparse_matrix(self, start: int, n: int) -> Tensor:
        """Columns ``[start, start + n)`` of the sparse sketch as a ``(dim_out, n)`` CSR matrix.

        A CSR product sums each output over its nonzeros in a fixed order (rows, then
        coordinates), so a row's result does not depend on the batch; it is also ~5x faster on
        CPU than scattering with ``index_add_``.
        """
        key = (start, n)
        if key in self._tables:
            return self._tables[key]
        s, d = self.spec.sparsity, self.spec.dim_out
        width = d // s
        coord = torch.arange(start, start + n, dtype=torch.int64, device=self.device)
        block = torch.arange(s, dtype=torch.int64, device=self.device).unsqueeze(1)
        counter = coord.unsqueeze(0) * s + block  # unique per (coordinate, block), < 2^63
        h = hash32(hash32((counter & _MASK32) ^ _seed_key(self.spec.seed, 0x5BD1E995)) ^ (counter >> 32))
        # Multiply-shift maps the upper 31 bits uniformly to [0, width); bit 0 is the sign.
        rows = (block * width + (((h >> 1) * width) >> 31)).reshape(-1)
        signs = ((1 - 2 * (h & 1)).to(torch.float32) / math.sqrt(s)).reshape(-1)
        cols = (coord - start).expand(s, n).reshape(-1)
        # A row's entries all come from one block k, so a stable sort keeps their columns ascending.
        order = torch.sort(rows, stable=True).indices
        crow = torch.zeros(d + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=d), 0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all we use
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(crow.to(torch.int32), cols[order].to(torch.int32), signs[order],
                                             size=(d, n), check_invariants=False)
        if self.cache:
            self._tables[key] = matrix
        return matrix

    def _dense_rows(self, start: int, n: int) -> Tensor:
        """Rows ``[start, start + n)`` of the dense ``(dim_in, dim_out)`` ``±1/sqrt(d)`` matrix.

        Each aligned block of ``_DENSE_BLOCK`` rows comes from its own CPU generator (seeded from
        the spec's seed and the block index), so any row range is reproducible on its own.
        """
        d = self.spec.dim_out
        first, last = start // _DENSE_BLOCK, (start + n - 1) // _DENSE_BLOCK
        parts = []
        for q in range(first, last + 1):
            gen = torch.Generator().manual_seed(hash32(_seed_key(self.spec.seed, 0x2545F491) ^ q) | (q << 32))
            # One random byte gives 8 signs: 8x fewer generator draws.
            bits = torch.randint(0, 256, (_DENSE_BLOCK, (d + 7) // 8), generator=gen, dtype=torch.uint8)
            shifts = torch.arange(8, dtype=torch.uint8)
            signs = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(_DENSE_BLOCK, -1)[:, :d]
            parts.append(signs)
        rows = torch.cat(parts)[start - first * _DENSE_BLOCK:][:n]
        return (rows.to(self.device, torch.float64) * 2 - 1) / math.sqrt(d)


def _aligned_chunks(blocks: Sequence[Tensor], size: int) -> Iterator[tuple[int, list[Tensor]]]:
    """Walk the column-wise concatenation of ``blocks`` in chunks ``[k * size, (k + 1) * size)``,
    yielding ``(start, pieces)``: the column slices of the blocks that make up the chunk."""
    pieces: list[Tensor] = []
    filled = start = 0
    for block in blocks:
        pos = 0
        while pos < block.shape[1]:
            take = min(size - filled, block.shape[1] - pos)
            pieces.append(block[:, pos:pos + take])
            filled += take
            pos += take
            if filled == size:
                yield start, pieces
                pieces, start, filled = [], start + size, 0
    if pieces:
        yield start, pieces


def _transposed(pieces: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The pieces' concatenation along columns, transposed to ``(n, B)`` and contiguous (so the
    sparse product gathers rows of B adjacent values). Copying each piece into place also casts
    and moves it; ``torch.cat`` of strided column slices is ~20x slower on CPU."""
    out = torch.empty(sum(p.shape[1] for p in pieces), pieces[0].shape[0], dtype=dtype, device=device)
    offset = 0
    for piece in pieces:
        out[offset:offset + piece.shape[1]].copy_(piece.t())
        offset += piece.shape[1]
    return out
