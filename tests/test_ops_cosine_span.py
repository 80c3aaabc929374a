"""Fused span cosine statistics (`cosine_span_stats_`: k inputs against one y, one call per block output):
every backend against the float64 single-pair oracle, and bit-identity with k `cosine_stats_` calls."""
from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_helpers import padding_mask, plant_nonfinite, poisoned_empty

from shortllm.ops import _backend, cosine_span_stats_, cosine_span_stats_ref, cosine_stats_, cosine_stats_ref

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# Per-row absolute error allowed on cos and on angular (the sums get tol * valid rows); the same bounds as
# the single op (tests/test_ops_cosine.py): the inputs are already rounded to the dtype and the oracle reads
# the same values in float64, so this bounds only the kernels' own arithmetic. float64 inputs are outside the
# kernels' dtypes: every backend hands them to the float64 reference.
ROW_TOL = {
    "ref": {F32: 1e-12, BF16: 1e-12, F16: 1e-12, F64: 1e-12},
    "cpu": {F32: 1e-12, BF16: 2e-6, F16: 2e-6, F64: 1e-12},
    "triton": {F32: 2e-5, BF16: 2e-5, F16: 2e-5, F64: 1e-12},
}


@pytest.fixture(autouse=True)
def _poison_scratch():
    # scratch buffers come from torch.empty: NaN-filled here, so a slot no program wrote shows up
    with poisoned_empty():
        yield


def make_inputs(n: int, d: int, k: int, dtype: torch.dtype, seed: int, noncontig: bool = False):
    """y and k inputs correlated with it to various degrees (cos spread over (-1, 1)), fresh per seed."""
    g = torch.Generator().manual_seed(seed)
    width = d + 5 if noncontig else d
    yb = torch.randn(n, width, generator=g) + 0.1
    xs = []
    for i in range(k):
        w = (-1.0) ** i * (0.2 + 0.3 * i)
        xs.append((w * yb + torch.randn(n, width, generator=g)).to(dtype)[:, :d])
    return xs, yb.to(dtype)[:, :d]


def start_acc(k: int, seed: int) -> torch.Tensor:
    # non-zero start: the op must add into acc, not overwrite it (quarters: acc - start gives back the counts exactly)
    return torch.randint(-12, 13, (k, 3), generator=torch.Generator().manual_seed(seed + 1)).to(F64) / 4


def oracle(xs, y, mask) -> torch.Tensor:
    """Independent oracle: the float64 single-pair reference on the valid rows only (sliced out first, so it
    never sees a padded row), pair by pair."""
    keep = torch.ones(y.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    yv = y[keep].double()
    return torch.stack([cosine_stats_ref(x[keep].double(), yv, None) for x in xs])


def assert_matches(backend, got, want, dtype, what=""):
    assert torch.equal(got[:, 2], want[:, 2]), f"{what}: counts {got[:, 2].tolist()} != {want[:, 2].tolist()}"
    tol = ROW_TOL[backend][dtype] * max(1.0, want[0, 2].item()) + 1e-12
    err = (got[:, :2] - want[:, :2]).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{backend} {dtype} {what}: |err|={err:.3g} > tol={tol:.3g}"


NS, DS, KS = (1, 129, 577), (1, 63, 577), (1, 3, 8)
DTYPES = (F32, BF16, F16, F64)


def _grid():
    # every (N, k, dtype); D rotates so each N meets every D, and every other case has strided rows
    out = []
    for i, (n, k, dt) in enumerate(itertools.product(NS, KS, DTYPES)):
        d = DS[i % len(DS)]
        out.append(pytest.param(n, d, k, dt, i % 2 == 1, id=f"{n}x{d}-k{k}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("n,d,k,dtype,noncontig", _grid())
def test_matches_pairwise_oracle_with_poisoned_padding(backend, n, d, k, dtype, noncontig):
    """Padding mask with NaN/Inf planted in the padded rows of y and of every x, acc starting non-zero: each
    row of acc gains exactly the oracle's sums over the valid rows (counts exact, sums within tolerance)."""
    seed = n * 1009 + d * 31 + k
    xs, y = make_inputs(n, d, k, dtype, seed, noncontig)
    mask = padding_mask(n, seed)
    plant_nonfinite([*xs, y], ~mask, seed)
    want = oracle(xs, y, mask)
    assert torch.isfinite(want).all(), "test setup: the valid rows must be finite"
    acc0 = start_acc(k, seed)
    acc = acc0.clone()
    cosine_span_stats_(xs, y, mask, acc)
    assert torch.isfinite(acc).all(), f"{backend} {dtype}: a padded row's NaN/Inf reached the sums: {acc.tolist()}"
    assert_matches(backend, acc - acc0, want, dtype, f"{n}x{d} k={k}")


@pytest.mark.parametrize("mask_kind", ["none", "padding", "nothing"])
@pytest.mark.parametrize("dtype", (F32, BF16, F16))
def test_bit_identical_to_single_calls(backend, dtype, mask_kind):
    """What the scorer relies on: one fused call adds exactly (bit for bit) what k cosine_stats_ calls add,
    on the same backend, so scores do not change with the fusion."""
    n, d, k = 77, 133, 6  # several row blocks, a lane tail, a short last group of inputs
    xs, y = make_inputs(n, d, k, dtype, seed=17, noncontig=True)
    mask = {"none": None, "padding": padding_mask(n, 5), "nothing": torch.zeros(n, dtype=torch.bool)}[mask_kind]
    fused, single = start_acc(k, 3), start_acc(k, 3)
    cosine_span_stats_(xs, y, mask, fused)
    for i, x in enumerate(xs):
        cosine_stats_(x, y, mask, single[i])
    assert torch.equal(fused, single), (fused - single).abs().max()


def test_strided_accumulator_views(backend):
    """acc may be a view: the scorer's anti-diagonal of its [n_max, L, 3] sums (contiguous rows), or a view
    whose inner stride is not 1; only the viewed elements change."""
    xs, y = make_inputs(40, 65, 4, F32, seed=4)
    mask = padding_mask(40, 4)
    want = oracle(xs, y, mask)
    big = torch.randint(-12, 13, (4, 7, 3)).to(F64) / 4
    before = big.clone()
    j = 5
    diag = big.as_strided((4, 3), (big.stride(0) - big.stride(1), 1), j * big.stride(1))
    cosine_span_stats_(xs, y, mask, diag)
    for i in range(4):
        assert_matches(backend, (big[i, j - i] - before[i, j - i])[None], want[i:i + 1], F32, f"diag row {i}")
        big[i, j - i] = before[i, j - i]
    assert torch.equal(big, before), "elements outside the view changed"
    wide = torch.zeros(4, 6, dtype=F64)
    cosine_span_stats_(xs, y, mask, wide[:, ::2])
    assert_matches(backend, wide[:, ::2], want, F32, "inner stride 2")
    assert (wide[:, 1::2] == 0).all()


@pytest.mark.parametrize("dtype", (F32, BF16, F16))
def test_zero_vector_rows_have_cos_one(backend, dtype):
    xs, y = make_inputs(24, 77, 3, dtype, seed=9)
    y[2].zero_()  # every pair: cos 1
    xs[1][5].zero_()  # one pair only
    xs[0][7].zero_()
    y[7].zero_()
    acc = torch.zeros(3, 3, dtype=F64)
    cosine_span_stats_(xs, y, None, acc)
    assert_matches(backend, acc, oracle(xs, y, None), dtype, "zero rows")
    only = torch.tensor([2, 7])
    acc = torch.zeros(3, 3, dtype=F64)
    cosine_span_stats_([x[only] for x in xs], y[only], None, acc)
    assert acc.tolist() == [[2.0, 0.0, 2.0]] * 3, f"zero rows must give cos=1, angular=0; got {acc.tolist()}"


def test_nan_in_valid_rows_still_propagates(backend):
    # ignoring padding must not hide a NaN in a row that counts: in one x, only that pair; in y, every pair
    xs, y = make_inputs(40, 65, 3, F32, seed=8, noncontig=True)
    mask = padding_mask(40, seed=8)
    r = int(mask.nonzero()[-1])
    xs[1][r, 3] = float("nan")
    acc = torch.zeros(3, 3, dtype=F64)
    cosine_span_stats_(xs, y, mask, acc)
    assert torch.isnan(acc[1, :2]).all() and torch.isfinite(acc[[0, 2]]).all(), acc
    assert (acc[:, 2] == mask.sum()).all(), acc
    y[r, 0] = float("inf")
    acc.zero_()
    cosine_span_stats_(xs, y, mask, acc)
    assert torch.isnan(acc[:, :2]).all() and (acc[:, 2] == mask.sum()).all(), acc


def test_large_magnitude_bf16_rows(backend):
    """bf16 rows whose float32 squares over/underflow: the C++ kernel redoes such pairs in double, pair by
    pair (the other pairs of the same y row stay on the fast path)."""
    xs, y = make_inputs(64, 577, 3, F32, seed=12)
    xs, y = [x.float() for x in xs], y.float()
    scales = (1e4, 3e-3, 1e25, 1e-25) if backend != "triton" else (1e4, 3e-3, 1e6, 1e-6)
    for i, s in enumerate(scales):
        xs[0][8 * i: 8 * i + 8] *= s  # x_0 only
        y[32 + 8 * i: 32 + 8 * i + 4] *= s  # y: every pair
    xs, y = [x.to(BF16) for x in xs], y.to(BF16)
    mask = padding_mask(64, 1)
    acc = torch.zeros(3, 3, dtype=F64)
    cosine_span_stats_(xs, y, mask, acc)
    assert_matches(backend, acc, oracle(xs, y, mask), BF16, "large magnitudes")
    single = torch.zeros(3, 3, dtype=F64)
    for i, x in enumerate(xs):
        cosine_stats_(x, y, mask, single[i])
    assert torch.equal(acc, single)


def test_more_inputs_than_one_pass_and_empty_cases(backend):
    # k > 16: the C++ kernel takes groups of 16 (same sums); k = 0 and N = 0 are no-ops
    xs, y = make_inputs(33, 40, 19, BF16, seed=2)
    acc = start_acc(19, 2)
    acc0 = acc.clone()
    cosine_span_stats_(xs, y, None, acc)
    assert_matches(backend, acc - acc0, oracle(xs, y, None), BF16, "k=19")
    empty = torch.zeros(0, 3, dtype=F64)
    cosine_span_stats_([], y, None, empty)
    acc = start_acc(2, 0)
    acc0 = acc.clone()
    cosine_span_stats_([torch.zeros(0, 8), torch.zeros(0, 8)], torch.zeros(0, 8), None, acc)
    assert torch.equal(acc, acc0)


def test_mask_of_other_dtype_and_shape(backend):
    xs, y = make_inputs(20, 64, 2, F32, seed=2)
    m = (torch.arange(20) % 3 == 0).to(torch.int32).reshape(4, 5)  # any dtype/shape with N entries
    acc = torch.zeros(2, 3, dtype=F64)
    cosine_span_stats_(xs, y, m, acc)
    assert_matches(backend, acc, oracle(xs, y, m.reshape(-1) != 0), F32, "int mask")


def test_ref_is_the_single_reference_pair_by_pair():
    xs, y = make_inputs(30, 20, 3, BF16, seed=6)
    mask = padding_mask(30, 6)
    got = cosine_span_stats_ref(xs, y, mask)
    assert got.dtype == F64 and got.shape == (3, 3)
    for i, x in enumerate(xs):
        assert torch.equal(got[i], cosine_stats_ref(x, y, mask))


def test_bad_arguments_are_rejected():
    xs, y = make_inputs(6, 8, 2, F32, seed=1)
    acc = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="xs\\[1\\]"):
        cosine_span_stats_([xs[0], xs[1][:5]], y, None, acc)
    with pytest.raises(ValueError, match="acc must be a float64 tensor of shape \\[2, 3\\]"):
        cosine_span_stats_(xs, y, None, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="acc must be a float64"):
        cosine_span_stats_(xs, y, None, torch.zeros(2, 3, dtype=F32))
    with pytest.raises(ValueError, match="mask has 5 entries"):
        cosine_span_stats_(xs, y, torch.ones(5, dtype=torch.bool), acc)
    with pytest.raises(ValueError, match="y must be"):
        cosine_span_stats_([x.reshape(-1) for x in xs], y.reshape(-1), None, acc)


def test_torch_library_opcheck():
    xs, y = make_inputs(9, 17, 3, F32, seed=3)
    op = torch.ops.shortllm.cosine_span_stats_.default
    torch.library.opcheck(op, (xs, y, padding_mask(9, 3), torch.zeros(3, 3, dtype=F64)))
    torch.library.opcheck(op, (xs, y, None, torch.zeros(3, 3, dtype=F64)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 200),
    d=st.integers(1, 150),
    k=st.integers(1, 17),
    dtype=st.sampled_from((F32, BF16, F16)),
    noncontig=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_fused_equals_single_calls(monkeypatch, n, d, k, dtype, noncontig, masked, seed):
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    monkeypatch.setenv("SHORTLLM_BACKEND", "cpu")
    xs, y = make_inputs(n, d, k, dtype, seed, noncontig)
    mask = padding_mask(n, seed) if masked else None
    fused, single = start_acc(k, seed), start_acc(k, seed)
    cosine_span_stats_(xs, y, mask, fused)
    for i, x in enumerate(xs):
        cosine_stats_(x, y, mask, single[i])
    assert torch.equal(fused, single)


def test_cosine_collector_one_call_per_block_same_sums(monkeypatch):
    """CosineCollector scores every span ending at block j with one fused call, adding into the anti-diagonal
    acc[i, j - i]: its sums equal the per-span single calls bit for bit (all tokens and last-token modes)."""
    from shortllm.scoring import collectors
    from shortllm.scoring.context import BatchContext

    calls = []
    real = collectors.cosine_span_stats_
    monkeypatch.setattr(collectors, "cosine_span_stats_", lambda *a: (calls.append(len(a[0])), real(*a))[1])
    L, n_max, B, T, D = 6, 4, 2, 9, 33
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(B, T, D, generator=g) for _ in range(L + 1)]
    am = torch.ones(B, T, dtype=torch.long)
    am[0, 6:] = 0
    valid = am.reshape(-1).bool()
    last = torch.zeros(B, T, dtype=torch.bool)
    last[0, 5] = last[1, 8] = True
    ctx = BatchContext(index=0, input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=am, valid=valid,
                       last=last.reshape(-1), n_valid=int(valid.sum()))
    for tokens in ("all", "last"):
        calls.clear()
        col = collectors.CosineCollector(L, n_max, tokens, True, True, torch.device("cpu"))
        col.begin_batch(ctx)
        for j in range(L):
            col.on_block(j, hs[j], hs[j + 1], ctx)
        col.end_batch(ctx)
        assert calls == [min(n_max, j + 1) for j in range(L)], calls
        want = torch.zeros(n_max, L, 3, dtype=F64)
        span_mask = valid if tokens == "all" else last.reshape(-1)
        for j in range(L):
            for n in range(1, min(n_max, j + 1) + 1):
                cosine_stats_(hs[j + 1 - n].reshape(-1, D), hs[j + 1].reshape(-1, D), span_mask, want[n - 1, j + 1 - n])
        assert torch.equal(col.acc, want), tokens
