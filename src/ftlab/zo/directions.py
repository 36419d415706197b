"""The random directions z of MeZO: a pure function of (step seed, parameter index, element index).

A step perturbs every trainable tensor along z three times (+eps, -2 eps, restore + update), so
how z is made decides what a step costs outside its two forwards. Three generators:

``"strided"`` (default) -- a constant number of operations per tensor, whatever its size.
    Element ``i`` of parameter ``k`` (flat, row-major, ``C = chunk_size``) is::

        z[i] = S[o2 + (i // C) * s2]  *  T[o + (i // C) * s + i % C]

    where ``T`` is a fixed table of 2^20 N(0, 1) draws (or their signs: Rademacher) and ``S`` a
    fixed table of 2^20 random signs, both made on the CPU from fixed seeds and copied to each
    device, and ``(o, s, o2, s2)`` are drawn per (step seed, k) from a seeded ``random.Random``.
    Viewing the tensor as rows of C entries, z is *one strided view* of the table (row r starts
    at ``o + r s``) times one strided view of the sign table (one sign a row), so a move
    ``theta += c z`` is a single ``addcmul_`` over the whole tensor (plus one for a last, partial
    row): no temporaries, no Python loop over chunks, one kernel launch on a GPU.
    E[z z^T] = I: entries of one row are distinct table draws; two rows may read overlapping
    table entries (when ``(R - 1) C`` exceeds the table) but carry independent random signs, so
    their products average to zero, as the chunked table design's chunks do (Salimans et al.,
    2017, read whole perturbations from one offset). The stride is drawn from the upper half of
    what the table allows, so rows overlap as little as the table permits.
    Because z is a function of the *global* element index, a shard holding elements [a, b) of a
    tensor (FSDP2's ``Shard(0)``) makes its part alone: at most three pieces (a partial first
    row, whole rows, a partial last row).

``"table"`` -- the first ftlab design: chunks of C entries, each a slice of ``T`` at its own
    random offset with its own sign. Loop over chunks (launches grow with the tensor). Kept so
    that runs recorded with it replay.

``"torch"`` -- fresh i.i.d. draws from a ``torch.Generator`` per (step seed, k), C at a time.

A move on a parameter is done *piece by piece*: a :class:`Piece` names the entries of the local
tensor it covers (``where``, a slice of the flat local tensor), z there (shaped ``(rows, cols)``
for ``strided``, 1-D for the others) and the sign (a float, or a ``(rows, 1)`` tensor).
"""

from __future__ import annotations

import functools
import math
import random
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ftlab.distributed import local_part  # noqa: F401  (re-exported: part of z's definition)
from ftlab.errors import FtlabError

TABLE_SIZE, TABLE_SEED = 1 << 20, 20230527  # the shared noise table: 4 MiB in fp32
SIGN_TABLE_SIZE, SIGN_SEED = 1 << 20, 20240611  # the row signs of the strided generator
GENERATORS = ("strided", "table", "torch")
DISTRIBUTIONS = ("gaussian", "rademacher")


@functools.lru_cache(maxsize=8)
def noise_table(distribution: str, device: str, dtype: torch.dtype) -> Tensor:
    """The fixed table z is read from (``table`` and ``strided``): TABLE_SIZE draws made on the
    CPU from TABLE_SEED (so every device sees the same numbers), then moved to ``device``."""
    table = torch.randn(TABLE_SIZE, generator=torch.Generator().manual_seed(TABLE_SEED))
    if distribution == "rademacher":
        table = torch.where(table >= 0, 1.0, -1.0)
    return table.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=8)
def sign_table(device: str, dtype: torch.dtype) -> Tensor:
    """SIGN_TABLE_SIZE fixed random signs (+-1), made on the CPU from SIGN_SEED."""
    bits = torch.randint(0, 2, (SIGN_TABLE_SIZE,), generator=torch.Generator().manual_seed(SIGN_SEED))
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def param_seed(step_seed: int, index: int) -> int:
    """Distinct, well-mixed seeds per (step, parameter), stable across processes and devices."""
    return (step_seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


class Piece(NamedTuple):
    """A part of one parameter's move: ``flat_local[where].view(z.shape) += coef * sign * z``."""

    where: slice
    z: Tensor
    sign: float | Tensor


class Strides(NamedTuple):
    """Where parameter k's z lives in the tables for one step (see the module docstring)."""

    offset: int
    stride: int
    sign_offset: int
    sign_stride: int


def strides(step_seed: int, index: int, numel: int, chunk: int) -> Strides:
    """The table offsets and row strides of the strided generator for a tensor of ``numel``
    entries; a pure function of its arguments (the same for every shard and device)."""
    rows, width = math.ceil(numel / chunk), min(chunk, numel)
    rng = random.Random(param_seed(step_seed, index))
    if rows <= 1:
        return Strides(rng.randrange(TABLE_SIZE - width + 1), width, rng.randrange(SIGN_TABLE_SIZE), 1)
    s_max = (TABLE_SIZE - width) // (rows - 1)
    s2_max = (SIGN_TABLE_SIZE - 1) // (rows - 1)
    if s_max < 1 or s2_max < 1:
        raise FtlabError(f"a tensor of {numel} entries needs {rows} rows of z at chunk_size={chunk}, more "
                         f"than the noise table allows; raise zo.chunk_size")
    s = rng.randint(min(width, max(1, s_max // 2)), s_max) if s_max < width else rng.randint(width, s_max)
    s2 = rng.randint(max(1, s2_max // 2), s2_max)
    return Strides(rng.randrange(TABLE_SIZE - width - (rows - 1) * s + 1), s,
                   rng.randrange(SIGN_TABLE_SIZE - (rows - 1) * s2), s2)


def strided_pieces(step_seed: int, index: int, numel: int, start: int, stop: int, chunk: int,
                   distribution: str, device: torch.device, dtype: torch.dtype,
                   max_rows: int | None = None) -> list[Piece]:
    """Pieces of z for global entries ``[start, stop)`` of a tensor of ``numel`` entries: a
    partial first row, blocks of whole rows (all of them in one block unless ``max_rows``
    bounds it) and a partial last row. ``where`` is relative to ``start`` (the local shard)."""
    if stop <= start:
        return []
    st = strides(step_seed, index, numel, chunk)
    table, signs = noise_table(distribution, str(device), dtype), sign_table(str(device), dtype)
    out: list[Piece] = []

    def add(row: int, col: int, rows: int, cols: int) -> None:
        lo = row * chunk + col - start
        z = table.as_strided((rows, cols), (st.stride, 1), st.offset + row * st.stride + col)
        sign = signs.as_strided((rows, 1), (st.sign_stride, 1), st.sign_offset + row * st.sign_stride)
        out.append(Piece(slice(lo, lo + rows * cols), z, sign))

    row, col = divmod(start, chunk)
    if col:  # a partial first row
        cols = min(chunk - col, stop - start)
        add(row, col, 1, cols)
        row += 1
    last_row, last_col = divmod(stop, chunk)
    step = max_rows or max(1, last_row - row)
    while row < last_row:
        rows = min(step, last_row - row)
        add(row, 0, rows, chunk)
        row += rows
    if last_col and row == last_row:
        add(row, 0, 1, last_col)
    return out


def chunked_pieces(generator: str, step_seed: int, index: int, numel: int, chunk: int, distribution: str,
                   device: torch.device, dtype: torch.dtype) -> Iterator[Piece]:
    """The ``table`` and ``torch`` generators: consecutive chunks of ``chunk`` entries."""
    seed = param_seed(step_seed, index)
    if generator == "table":
        table = noise_table(distribution, str(device), dtype)
        rng = random.Random(seed)
        for start in range(0, numel, chunk):
            length = min(chunk, numel - start)
            offset = rng.randrange(TABLE_SIZE - length + 1)
            sign = 1.0 if rng.getrandbits(1) else -1.0
            yield Piece(slice(start, start + length), table[offset:offset + length], sign)
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, numel, chunk):
        length = min(chunk, numel - start)
        if distribution == "gaussian":
            z = torch.randn(length, generator=gen, device=device, dtype=torch.float32)
        else:
            z = torch.randint(0, 2, (length,), generator=gen, device=device).float().mul_(2).sub_(1)
        yield Piece(slice(start, start + length), z.to(dtype), 1.0)


def add_z(theta: Tensor, piece: Piece, coef: float) -> None:
    """``theta += coef * sign * z`` in place (one kernel)."""
    if isinstance(piece.sign, Tensor):
        theta.addcmul_(piece.z, piece.sign, value=coef)
    else:
        theta.add_(piece.z, alpha=piece.sign * coef)


def add_z_into(out: Tensor, theta: Tensor, piece: Piece, coef: float) -> None:
    """``out = theta + coef * sign * z`` (one kernel; ``theta`` is left as it is)."""
    if isinstance(piece.sign, Tensor):
        torch.addcmul(theta, piece.z, piece.sign, value=coef, out=out)
    else:
        torch.add(theta, piece.z, alpha=piece.sign * coef, out=out)


def signed_z(piece: Piece, coef: float, dtype: torch.dtype) -> Tensor:
    """A new tensor ``coef * sign * z`` in ``dtype`` (the variants' gradient estimate)."""
    if isinstance(piece.sign, Tensor):
        return torch.mul(piece.z.to(dtype), piece.sign.to(dtype)).mul_(coef)
    return piece.z.to(dtype, copy=True).mul_(piece.sign * coef)
