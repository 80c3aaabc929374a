"""Row-cosine statistics: every backend (ref, C++ cpu, Triton interpreted) against the float64 oracle."""
from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_helpers import need_triton, padding_mask, plant_nonfinite, poisoned_empty

from shortllm.ops import _backend, cosine_stats_, cosine_stats_ref

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = (F32, BF16, F16)

# Per-row absolute error allowed on cos and on angular; the sums get tol * rows. The inputs are already
# rounded to the dtype and the oracle reads the same values in float64, so this bounds only the
# kernels' own arithmetic: C++ float32 rows -> exact double products; C++ bf16/fp16 -> exact float32
# products with short float32 runs flushed to double; Triton -> float32 row sums. float64 inputs are
# outside the kernels' dtypes: every backend hands them to the float64 reference.
ROW_TOL = {
    "ref": {F32: 1e-12, BF16: 1e-12, F16: 1e-12, F64: 1e-12},
    "cpu": {F32: 1e-12, BF16: 2e-6, F16: 2e-6, F64: 1e-12},
    "triton": {F32: 2e-5, BF16: 2e-5, F16: 2e-5, F64: 1e-12},
}
START = (0.25, -1.5, 3.0)  # acc starts non-zero: the op must add, not overwrite


@pytest.fixture(autouse=True)
def _poison_scratch():
    # partial-sum buffers come from torch.empty: NaN-filled here, so a slot no program wrote shows up
    with poisoned_empty():
        yield



def make_xy(n: int, d: int, dtype: torch.dtype, noncontig: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = d + 7 if noncontig else d
    xb = torch.randn(n, width, generator=g) + 0.1
    yb = 0.6 * xb + torch.randn(n, width, generator=g)  # correlated rows: cos spread over (-1, 1)
    x, y = xb.to(dtype)[:, :d], yb.to(dtype)[:, :d]
    if noncontig and d > 1 and n > 1:
        assert not x.is_contiguous() and x.stride(0) == width, "test setup: rows must be strided"
    return x, y


def make_mask(kind: str, n: int, seed: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(n, dtype=torch.bool)
    if kind == "nothing":
        return torch.zeros(n, dtype=torch.bool)
    m = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.6
    m[0] = True
    return m


def check(backend: str, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    acc = torch.tensor(START, dtype=torch.float64)
    cosine_stats_(x, y, mask, acc)
    got = acc - torch.tensor(START, dtype=torch.float64)
    want = cosine_stats_ref(x, y, mask)
    assert got[2].item() == want[2].item(), f"count {got[2].item()} != {want[2].item()}"
    tol = ROW_TOL[backend][x.dtype] * max(1.0, want[2].item()) + 1e-12
    err = (got[:2] - want[:2]).abs().max().item()
    assert err <= tol, f"{backend} {x.dtype} {tuple(x.shape)}: |err|={err:.3g} > tol={tol:.3g}"
    return got


NS, DS = (1, 3, 129, 4097), (1, 64, 577, 4096)
MASKS = ("none", "some", "all", "nothing")


def _cases(ns, ds, dtypes):
    # every (N, D, dtype); masks and row layout rotate through the grid so each appears at every size
    out = []
    for i, (n, d, dt) in enumerate(itertools.product(ns, ds, dtypes)):
        out.append(pytest.param(n, d, dt, MASKS[i % 4], i % 2 == 0, id=f"{n}x{d}-{str(dt)[6:]}-{MASKS[i % 4]}"))
    return out


@pytest.mark.parametrize("n,d,dtype,mask_kind,noncontig", _cases(NS, DS, DTYPES))
def test_cpu_grid(monkeypatch, n, d, dtype, mask_kind, noncontig):
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    monkeypatch.setenv("SHORTLLM_BACKEND", "cpu")
    x, y = make_xy(n, d, dtype, noncontig, seed=n * 7 + d)
    check("cpu", x, y, make_mask(mask_kind, n, seed=d))


@pytest.mark.parametrize("n,d,dtype,mask_kind,noncontig", _cases((1, 3, 129), (1, 64, 577), DTYPES))
def test_triton_grid(monkeypatch, n, d, dtype, mask_kind, noncontig):
    need_triton(monkeypatch)
    monkeypatch.setenv("SHORTLLM_BACKEND", "triton")
    x, y = make_xy(n, d, dtype, noncontig, seed=n * 7 + d)
    check("triton", x, y, make_mask(mask_kind, n, seed=d))


@pytest.mark.parametrize("n,d,dtype,mask_kind,noncontig", _cases((1, 129), (64, 577), (F32, BF16)))
def test_ref_grid(monkeypatch, n, d, dtype, mask_kind, noncontig):
    monkeypatch.setenv("SHORTLLM_BACKEND", "ref")
    x, y = make_xy(n, d, dtype, noncontig, seed=n + d)
    check("ref", x, y, make_mask(mask_kind, n, seed=d))


def test_large_shapes_big_tiles(backend):
    # long rows (several D tiles / lane flushes) and many rows (several row blocks / programs)
    n, d = (4097, 64) if backend == "triton" else (4097, 4096)
    x, y = make_xy(n, d, BF16, True, seed=5)
    check(backend, x, y, make_mask("some", n, seed=3))
    x, y = make_xy(33, 4096, F16, True, seed=6)
    check(backend, x, y, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_vector_rows_have_cos_one(backend, dtype):
    x, y = make_xy(40, 577, dtype, True, seed=11)
    x[0].zero_()
    y[5].zero_()
    x[7].zero_()
    y[7].zero_()
    got = check(backend, x, y, None)
    only = torch.tensor([0, 5, 7])
    acc = torch.zeros(3, dtype=torch.float64)
    cosine_stats_(x[only], y[only], None, acc)
    assert acc.tolist() == [3.0, 0.0, 3.0], f"zero rows must give cos=1, angular=0; got {acc.tolist()}"
    assert torch.isfinite(got).all(), "zero rows must not produce NaN"


def test_large_magnitude_bf16_rows(backend):
    x, y = make_xy(64, 577, F32, False, seed=12)
    # C++ kernels handle the whole bf16 range (double fallback when float32 squares over/underflow);
    # the Triton kernel sums in float32, so its range is |v| < ~1e19 (massive activations are ~1e4)
    scales = (1e4, 3e-3, 1e25, 1e-25) if backend != "triton" else (1e4, 3e-3, 1e6, 1e-6)
    for i, s in enumerate(scales):
        x[8 * i: 8 * i + 8] *= s
        y[8 * i: 8 * i + 4] *= s
    x, y = x.to(BF16), y.to(BF16)
    assert torch.isfinite(x.float()).all() and (x.float().abs().amax(1) > 0).all(), "test setup"
    check(backend, x, y, make_mask("some", 64, seed=1))


def test_nearly_parallel_rows_keep_angular_precision(backend):
    # cos ~ 1 - 5e-5: the angular term is ill-conditioned; float64/float32 sums must still resolve it
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4096, generator=g)
    y = x + 1e-2 * torch.randn(16, 4096, generator=g)
    acc = torch.zeros(3, dtype=torch.float64)
    cosine_stats_(x, y, None, acc)
    want = cosine_stats_ref(x, y, None)
    tol = {"ref": 1e-9, "cpu": 1e-9, "triton": 1e-2}[backend]  # float32 rows lose digits here
    assert abs(acc[1].item() - want[1].item()) <= tol * want[1].item() + 1e-12, (acc, want)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    noncontig=st.booleans(),
    mask_bits=st.one_of(st.none(), st.lists(st.booleans(), min_size=1, max_size=300)),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_matches_ref(monkeypatch, n, d, dtype, noncontig, mask_bits, seed):
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    monkeypatch.setenv("SHORTLLM_BACKEND", "cpu")
    x, y = make_xy(n, d, dtype, noncontig, seed)
    mask = None if mask_bits is None else torch.tensor((mask_bits * n)[:n], dtype=torch.bool)
    check("cpu", x, y, mask)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 70), d=st.integers(1, 200), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 999))
def test_property_triton_matches_ref(monkeypatch, n, d, dtype, seed):
    need_triton(monkeypatch)
    monkeypatch.setenv("SHORTLLM_BACKEND", "triton")
    x, y = make_xy(n, d, dtype, True, seed)
    check("triton", x, y, make_mask("some", n, seed))


def test_mask_of_other_dtype_and_shape(backend):
    x, y = make_xy(20, 64, F32, False, seed=2)
    m = (torch.arange(20) % 3 == 0).to(torch.int32).reshape(4, 5)  # any dtype/shape with N entries
    check(backend, x, y, m)


# Padded rows never reach a statistic, whatever they hold: NaN/Inf planted in masked rows only must leave
# the sums equal to the float64 reference over the valid rows alone (sliced out first, so the oracle never
# sees a padded row), on every backend, for every dtype the op takes.
PAD_SHAPES = [(1, 577), (129, 1), (129, 65), (577, 577)]


@pytest.mark.parametrize("dtype", (F32, BF16, F16, F64), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,d", PAD_SHAPES, ids=lambda v: str(v))
def test_nan_inf_in_padded_rows_never_reach_the_sums(backend, n, d, dtype):
    seed = n * 1009 + d
    x, y = make_xy(n, d, dtype, noncontig=d > 1, seed=seed)
    mask = padding_mask(n, seed)
    plant_nonfinite([x, y], ~mask, seed)
    assert torch.isfinite(x[mask].double()).all() and torch.isfinite(y[mask].double()).all(), "test setup"
    want = cosine_stats_ref(x[mask].double(), y[mask].double(), None)

    acc = torch.tensor(START, dtype=torch.float64)
    cosine_stats_(x, y, mask, acc)
    got = acc - torch.tensor(START, dtype=torch.float64)
    assert torch.isfinite(acc).all(), f"{backend} {dtype}: a padded row's NaN/Inf reached the sums: {got.tolist()}"
    assert got[2].item() == mask.sum().item(), f"count {got[2].item()} != {mask.sum().item()} valid rows"
    tol = ROW_TOL[backend][dtype] * max(1.0, want[2].item()) + 1e-12
    err = (got[:2] - want[:2]).abs().max().item()
    assert err <= tol, f"{backend} {dtype} {n}x{d}: |err|={err:.3g} > tol={tol:.3g}"


def test_nan_in_valid_rows_still_propagates(backend):
    # the other half of the contract: ignoring padding must not hide a NaN in a row that counts
    x, y = make_xy(40, 65, F32, noncontig=True, seed=8)
    mask = padding_mask(40, seed=8)
    x[int(mask.nonzero()[-1])] = float("nan")
    acc = torch.zeros(3, dtype=torch.float64)
    cosine_stats_(x, y, mask, acc)
    assert torch.isnan(acc[0]) and torch.isnan(acc[1]) and acc[2].item() == mask.sum().item(), acc
