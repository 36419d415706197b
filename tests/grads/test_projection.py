"""Random projections: determinism (seed, batch size, blocks), device-independent definition
checked against a pure-Python reference, JL error within the documented bound."""

import math

import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.grads import projection as proj
from ftlab.grads.projection import ProjectionSpec, Projector, hash32, jl_tolerance

KINDS = ["sparse", "rademacher"]


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _lowbias32(x: int) -> int:
    """Reference 32-bit mixer with Python's unbounded ints (the plain ``x * c mod 2^32``)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _reference_sparse_matrix(spec: ProjectionSpec) -> torch.Tensor:
    """The sketch's (dim_in, dim_out) matrix in float64, entry by entry from the documented hash."""
    s, width = spec.sparsity, spec.dim_out // spec.sparsity
    seed = spec.seed & (2**64 - 1)
    key = _lowbias32(_lowbias32((seed & 0xFFFFFFFF) ^ 0x5BD1E995) ^ (seed >> 32))
    m = torch.zeros(spec.dim_in, spec.dim_out, dtype=torch.float64)
    for j in range(spec.dim_in):
        for k in range(s):
            counter = j * s + k
            h = _lowbias32(_lowbias32((counter & 0xFFFFFFFF) ^ key) ^ (counter >> 32))
            m[j, k * width + (((h >> 1) * width) >> 31)] = (1 - 2 * (h & 1)) / math.sqrt(s)
    return m


def test_hash32_int64_tensors_match_unbounded_integer_arithmetic():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, *range(1_000_000, 1_000_050)]
    xs += torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    got = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(x) for x in xs]
    assert all(hash32(x) == _lowbias32(x) for x in xs[:20])  # also on Python ints


@pytest.mark.parametrize("seed", [0, 7, -3, 2**40 + 5])
def test_sparse_sketch_is_the_documented_matrix(seed):
    # The definition is integer arithmetic only, so any device computing it gets these entries.
    spec = ProjectionSpec(dim_in=300, dim_out=64, seed=seed, sparsity=4)
    m = _reference_sparse_matrix(spec)
    x = _randn(5, 300, seed=1, dtype=torch.float64)
    torch.testing.assert_close(Projector(spec).project(x).double(), x @ m, rtol=1e-5, atol=1e-5)


def test_sparse_sketch_structure_each_coordinate_hits_one_row_per_block():
    spec = ProjectionSpec(dim_in=500, dim_out=128, seed=3, sparsity=8)
    cols = Projector(spec).project(torch.eye(500))  # row j = image of e_j
    width = 128 // 8
    for k in range(8):
        block = cols[:, k * width:(k + 1) * width]
        assert torch.equal((block != 0).sum(1), torch.ones(500, dtype=torch.long))
        assert torch.allclose(block.abs().sum(1), torch.full((500,), 1 / math.sqrt(8)))
    # So every basis vector keeps its norm exactly, and the rows are spread over all outputs.
    torch.testing.assert_close(cols.norm(dim=1), torch.ones(500))
    assert (cols != 0).any(0).float().mean() > 0.95


@pytest.mark.parametrize("kind", KINDS)
def test_same_spec_same_features_other_seed_other_features(kind):
    x = _randn(3, 5000)
    a = Projector(ProjectionSpec(5000, 256, seed=1, kind=kind)).project(x)
    b = Projector(ProjectionSpec(5000, 256, seed=1, kind=kind), cache=False).project(x)
    c = Projector(ProjectionSpec(5000, 256, seed=2, kind=kind)).project(x)
    assert a.dtype == torch.float32 and a.shape == (3, 256)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1 * a.abs().max()


def _assert_same_rows(got, want, kind):
    """Sparse: bitwise (CSR sums in a fixed order). Dense: BLAS may block a product differently
    for another batch size, so equal up to float32 summation order (1e-6 of the row's norm)."""
    if kind == "sparse":
        assert torch.equal(got, want)
    else:
        assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_rows_do_not_depend_on_the_batch(kind):
    x = _randn(16, 3000, seed=2)  # crosses two dense blocks
    p = Projector(ProjectionSpec(3000, 256, seed=5, kind=kind))
    full = p.project(x)
    for lo, hi in [(0, 1), (3, 4), (5, 12), (15, 16)]:
        _assert_same_rows(p.project(x[lo:hi]), full[lo:hi], kind)
    shuffled = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    _assert_same_rows(p.project(x[shuffled]), full[shuffled], kind)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_equal_the_concatenation(kind):
    x = _randn(4, 3000, seed=3)
    p = Projector(ProjectionSpec(3000, 128, seed=0, kind=kind))
    cuts = [0, 1, 700, 1024, 1025, 2999, 3000]  # includes dense-block boundaries
    blocks = [x[:, a:b].reshape(4, -1, 1) for a, b in zip(cuts, cuts[1:])]  # any trailing shape
    _assert_same_rows(p.project_blocks(blocks), p.project(x), kind)


def test_blocks_crossing_the_internal_chunk_are_bitwise_equal(monkeypatch):
    monkeypatch.setattr(proj, "_CHUNK", 1000)  # small chunks, same code path as 2^20
    x = _randn(2, 3500, seed=4)
    p = Projector(ProjectionSpec(3500, 64, seed=9))
    blocks = [x[:, :999], x[:, 999:2500], x[:, 2500:]]
    assert torch.equal(p.project_blocks(blocks), p.project(x))
    m = _reference_sparse_matrix(p.spec)
    torch.testing.assert_close(p.project(x).double(), x.double() @ m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_in_float32_out(dtype):
    x = _randn(3, 2000, seed=5).to(dtype)
    p = Projector(ProjectionSpec(2000, 128))
    y = p.project(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, p.project(x.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_cuda_agree(kind):
    x = _randn(8, 50_000, seed=6)
    spec = ProjectionSpec(50_000, 1024, seed=11, kind=kind)
    cpu = Projector(spec).project(x)
    gpu = Projector(spec, device="cuda").project(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def _structured_points(kind: str, n: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(42)
    if kind == "gaussian":
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    elif kind == "low-rank":  # all points in a 3-dim subspace: large inner products
        x = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(3, dim, generator=g, dtype=torch.float64)
    elif kind == "sparse":  # 1% of the coordinates
        x = torch.randn(n, dim, generator=g, dtype=torch.float64) * (torch.rand(n, dim, generator=g) < 0.01)
    else:  # heavy-tailed, like Adam-preconditioned gradients: Student-t with 3 dof
        chi2 = torch.randn(3, n, dim, generator=g, dtype=torch.float64).square().sum(0)
        x = torch.randn(n, dim, generator=g, dtype=torch.float64) / (chi2 / 3).sqrt()
    return _unit(x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("points", ["gaussian", "low-rank", "sparse", "heavy-tailed"])
def test_inner_products_within_the_jl_tolerance(kind, points):
    n, dim, d = 40, 10_000, 1024
    x = _structured_points(points, n, dim)
    y = Projector(ProjectionSpec(dim, d, seed=1, kind=kind)).project(x).double()
    err = y @ y.T - x @ x.T
    assert err.abs().max() <= jl_tolerance(d, n, delta=0.01)
    if points == "low-rank":  # errors of points in a 3-dim subspace are too correlated to average
        return
    # Not only within the (loose) bound: the error is a JL map's, variance ~ (1 + <x,y>^2) / d.
    off = ~torch.eye(n, dtype=torch.bool)
    expected = ((1 + (x @ x.T) ** 2) / d)[off].mean()
    assert 0.75 < (err[off] ** 2).mean() / expected < 1.3


def test_projection_is_unbiased_over_seeds():
    x = _unit(_randn(2, 200, seed=8, dtype=torch.float64))
    x[1] = _unit(x[0:1] + x[1:2])[0]  # <x, y> ~ 0.7
    dots = torch.stack([
        (lambda y: y[0] @ y[1])(Projector(ProjectionSpec(200, 64, seed=s)).project(x).double())
        for s in range(200)])
    # Each estimate has sd <= sqrt((1 + c^2) / 64) ~ 0.154; the mean of 200 is within 4 sd of <x, y>.
    assert abs(dots.mean() - x[0] @ x[1]) < 4 * 0.154 / math.sqrt(200)


def test_jl_tolerance_formula_and_monotonicity():
    assert jl_tolerance(8192, 100, 0.01) == pytest.approx(math.sqrt(8 * math.log(2 * 100**2 / 0.01) / 8192))
    assert jl_tolerance(8192, 100) < jl_tolerance(4096, 100) < jl_tolerance(4096, 1000)
    assert jl_tolerance(8192, 100, 0.1) < jl_tolerance(8192, 100, 0.01)
    with pytest.raises(FtlabError):
        jl_tolerance(0, 10)
    with pytest.raises(FtlabError):
        jl_tolerance(100, 10, delta=1.5)


def test_spec_round_trip_and_bad_specs():
    spec = ProjectionSpec(dim_in=10, dim_out=8, seed=3, kind="rademacher")
    assert ProjectionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(FtlabError, match="unknown projection spec fields"):
        ProjectionSpec.from_dict({**spec.to_dict(), "shape": 3})
    with pytest.raises(FtlabError, match="unknown projection kind 'gauss'"):
        ProjectionSpec(10, kind="gauss")
    with pytest.raises(FtlabError, match="sparsity=3 must be >= 1 and divide dim_out=8192"):
        ProjectionSpec(10, sparsity=3)
    with pytest.raises(FtlabError, match="dims must be positive"):
        ProjectionSpec(0)


def test_wrong_input_width_is_an_error():
    p = Projector(ProjectionSpec(100, 16))
    with pytest.raises(FtlabError, match=r"sum n_i = dim_in = 100, got shapes \[\(2, 99\)\]"):
        p.project(torch.zeros(2, 99))
    with pytest.raises(FtlabError, match="one B"):
        p.project_blocks([torch.zeros(2, 50), torch.zeros(3, 50)])
    with pytest.raises(FtlabError):
        p.project_blocks([])
