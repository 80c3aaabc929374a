"""Taylor / magnitude reduction: every backend against the float64 oracle."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_helpers import poisoned_empty

from shortllm.ops import _backend, taylor_stats_, taylor_stats_ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
# Relative error allowed on [sum W*G, sum |W*G|] (relative to sum |W*G|) and on sum |W|: products are
# float32 (one rounding each); the C++ kernel sums runs of 8 per SIMD lane in float32 (relative error
# <= 7 ulp = 4e-7 per run) before float64; Triton sums in float64.
REL_TOL = {"ref": (1e-12, 1e-12), "cpu": (1e-6, 1e-6), "triton": (1e-6, 1e-12)}
START = (1.0, 2.0, -3.0)


@pytest.fixture(autouse=True)
def _poison_scratch():
    # partial-sum buffers come from torch.empty: NaN-filled here, so a slot no program wrote shows up
    with poisoned_empty():
        yield


def make_wg(shape, dtype, seed, noncontig=False, gdtype=None):
    g = torch.Generator().manual_seed(seed)
    full = tuple(shape[:-1]) + (shape[-1] + 5,) if noncontig else tuple(shape)
    w = (torch.randn(full, generator=g) * 0.02).to(dtype)
    gr = (torch.randn(full, generator=g) * 1e-3).to(gdtype or dtype)
    if noncontig:
        w, gr = w[..., : shape[-1]], gr[..., : shape[-1]]
    return w, gr


def check(backend, w, g):
    acc = torch.tensor(START, dtype=torch.float64)
    taylor_stats_(w, g, acc)
    got = acc - torch.tensor(START, dtype=torch.float64)  # (rounds at ~1e-16: the 1e-14 floors below)
    want = taylor_stats_ref(w, g)
    rel_wg, rel_w = REL_TOL[backend]
    scale = want[1].item()
    assert abs(got[0] - want[0]).item() <= rel_wg * scale + 1e-14, (backend, got, want)
    assert abs(got[1] - want[1]).item() <= rel_wg * scale + 1e-14, (backend, got, want)
    assert abs(got[2] - want[2]).item() <= rel_w * want[2].item() + 1e-14, (backend, got, want)
    return got


SHAPES = [(1,), (3, 5), (129, 577), (4097, 64), (64, 4096), (2, 3, 577)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_ref(backend, shape, dtype):
    if backend == "triton" and shape[0] * shape[-1] > 300_000:
        shape = shape[:-1] + (17,)  # interpreter: keep it small
    w, g = make_wg(shape, dtype, seed=sum(shape), noncontig=len(shape) > 1)
    check(backend, w, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_magnitude_only(backend, dtype):
    w, _ = make_wg((129, 577), dtype, seed=4)
    got = check(backend, w, None)
    assert got[0].item() == 0.0 and got[1].item() == 0.0, f"g=None must add nothing to the Taylor terms: {got}"


def test_mixed_precision_weight_and_grad(backend):
    w, g = make_wg((65, 300), BF16, seed=9, gdtype=F32)
    check(backend, w, g)


def test_fp16_products_do_not_underflow(backend):
    # |w*g| ~ 1e-9 is below fp16's range: products must be formed in float32
    w = torch.full((1000,), 3e-5, dtype=F16) * (1 + torch.rand(1000)).to(F16)
    g = torch.full((1000,), 4e-5, dtype=F16) * (1 + torch.rand(1000)).to(F16)
    got = check(backend, w, g)
    assert got[1].item() > 1e-6, f"fp16 products underflowed to zero: {got}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 200_000), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 9999), has_g=st.booleans())
def test_property_cpu(monkeypatch, n, dtype, seed, has_g):
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    monkeypatch.setenv("SHORTLLM_BACKEND", "cpu")
    w, g = make_wg((n,), dtype, seed)
    check("cpu", w, g if has_g else None)


@pytest.mark.parametrize("dtype", (F16, BF16), ids=lambda d: str(d)[6:])
def test_cpu_half_conversion_exhaustive(dtype):
    # every 16-bit pattern through the SIMD widening: 16 copies of v (one full vector) times g = 1
    # sum to exactly 16 v, so each value's float32 conversion is checked bit for bit
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    from shortllm import _cpu

    vals = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    w = vals.repeat_interleave(16).contiguous()
    g = torch.ones_like(w)
    acc = torch.zeros(vals.numel(), 3, dtype=torch.float64)
    code = 2 if dtype == F16 else 1
    wp, gp, ap = w.data_ptr(), g.data_ptr(), acc.data_ptr()
    for i in range(vals.numel()):
        _cpu.taylor_stats(wp + 32 * i, gp + 32 * i, 16, code, ap + 24 * i, 1)
    want = vals.double() * 16
    fin = torch.isfinite(want)
    assert torch.equal(acc[fin, 0], want[fin]), "finite half values must widen exactly"
    assert torch.equal(acc[fin, 2], want[fin].abs())
    assert torch.isnan(acc[vals.isnan(), 0]).all() and torch.equal(acc[vals.isinf(), 0], want[vals.isinf()])
