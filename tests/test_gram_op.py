"""Gram statistics (x^T x, x^T y in float64): every backend against the float64 oracle."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch
from ops_helpers import padding_mask, plant_nonfinite, poisoned_empty

from shortllm.ops import gram_, gram_ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
# Every product of two widened inputs is exact in float64; only the summation order differs from the
# reference's BLAS, so the error is a few float64 ulps of the sum of |products| (bound 1e-12 relative).
REL = 1e-12


@pytest.fixture(autouse=True)
def _poison_scratch():
    with poisoned_empty():
        yield


def make(n, d, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    cols = d + 3 if noncontig else d
    x = torch.randn(n, cols, generator=g).to(dtype)
    y = (torch.randn(n, cols, generator=g) * 3 + 1).to(dtype)
    if noncontig:
        x, y = x[:, :d], y[:, :d]
    return x, y


def bound(x, y, mask):
    xa, ya = x.double().abs(), y.double().abs()
    if mask is not None:
        xa, ya = xa[mask], ya[mask]
    return (xa.T @ xa) * REL + 1e-300, (xa.T @ ya) * REL + 1e-300


def run(x, y, mask, start_seed=7):
    d = x.shape[1]
    g = torch.Generator().manual_seed(start_seed)
    start_a = torch.randn(d, d, generator=g, dtype=torch.float64)  # pre-filled, not symmetric: must be kept
    start_b = torch.randn(d, d, generator=g, dtype=torch.float64)
    a, b = start_a.clone(), start_b.clone()
    gram_(x, y, mask, a, b)
    return a - start_a, b - start_b


def check(x, y, mask):
    got_a, got_b = run(x, y, mask)
    want_a, want_b = gram_ref(x, y, mask)
    ta, tb = bound(x, y, mask)
    # the subtraction of the pre-filled start costs one ulp of |start| (~4): the 1e-14 floor
    assert ((got_a - want_a).abs() <= ta + 1e-14).all(), (got_a - want_a).abs().max()
    assert ((got_b - want_b).abs() <= tb + 1e-14).all(), (got_b - want_b).abs().max()


SHAPES = [(1, 1), (1, 7), (129, 33), (577, 65), (129, 577), (64, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_ref(backend, shape, dtype):
    n, d = shape
    if backend == "triton" and n * d * d > 5_000_000:
        n = 33  # interpreter: keep it small
    x, y = make(n, d, dtype, seed=n + d, noncontig=d > 7)
    check(x, y, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n", [1, 129, 577])
def test_padding_mask_skips_nonfinite_rows(backend, n, dtype):
    d = 37
    x, y = make(n, d, dtype, seed=n)
    mask = padding_mask(n, seed=n) if n > 1 else torch.tensor([True])
    if n > 1:
        plant_nonfinite([x, y], ~mask, seed=n)
    check(x, y, mask)
    a, b = run(x, y, mask)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "a padded row reached the sums"


def test_all_rows_masked_adds_nothing(backend):
    x, y = make(9, 5, F32, seed=1)
    x[:] = float("nan")
    a, b = run(x, y, torch.zeros(9, dtype=torch.bool))
    assert (a.abs() <= 1e-14).all() and (b.abs() <= 1e-14).all()


def test_nonfinite_in_a_valid_row_propagates(backend):
    x, y = make(17, 6, F32, seed=2)
    x[3, 2] = float("nan")
    a, b = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
    gram_(x, y, None, a, b)
    assert torch.isnan(a[2]).all() and torch.isnan(b[2]).all(), "NaN in a valid row must not vanish"


def test_streaming_equals_one_call(backend):
    # accumulating batch after batch is the statistic of all the rows together
    x, y = make(300, 21, BF16, seed=3)
    mask = padding_mask(300, seed=3)
    a = torch.zeros(21, 21, dtype=torch.float64)
    b = torch.zeros(21, 21, dtype=torch.float64)
    for s in range(0, 300, 77):
        gram_(x[s:s + 77], y[s:s + 77], mask[s:s + 77], a, b)
    wa, wb = gram_ref(x, y, mask)
    ta, tb = bound(x, y, mask)
    assert ((a - wa).abs() <= ta).all() and ((b - wb).abs() <= tb).all()


def test_bad_accumulator_is_refused():
    x, y = make(4, 3, F32, seed=0)
    with pytest.raises(ValueError, match="float64"):
        gram_(x, y, None, torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        gram_(x, y, None, torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        gram_(x, y, torch.ones(5, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.float64),
              torch.zeros(3, 3, dtype=torch.float64))


def test_fake_registration_traces():
    # the op's schema and fake implementation let FakeTensor / torch.compile trace it without running it
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 4)
        a = torch.empty(4, 4, dtype=torch.float64)
        torch.ops.shortllm.gram_(x, x, None, a, a.clone())


def test_cpu_kernel_is_thread_count_independent():
    from shortllm.ops import _backend

    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    from shortllm import _cpu
    from shortllm.ops._cpu_backend import DTYPE_CODES

    x, y = make(200, 19, F16, seed=5)
    outs = []
    for nt in (1, 2, 3):
        a = torch.zeros(19, 19, dtype=torch.float64)
        b = torch.zeros(19, 19, dtype=torch.float64)
        _cpu.gram_stats(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), 200, 19, DTYPE_CODES[F16], 0,
                        a.data_ptr(), b.data_ptr(), nt)
        outs.append((a, b))
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])


_COMPILE = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from shortllm.kernels import gram as G

sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "m_ptr": "*u8", "xtx_ptr": "*fp64", "xty_ptr": "*fp64", "N": "i32",
       "D": "i32", "sx": "i64", "sy": "i64", "HAS_MASK": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
for arch in (80, 90):
    k = triton.compile(ASTSource(fn=JITFunction(G.gram_kernel), signature=sig,
                                 constexprs={"HAS_MASK": True, "BLOCK_R": 32, "BLOCK_D": 32}),
                       target=GPUTarget("cuda", arch, 32))
    assert len(k.asm["cubin"]) > 1000, arch
print("ok")
'''


def test_triton_gram_kernel_compiles_for_sm80_and_sm90():
    """The float64 tl.dot the interpreter accepts must also compile for real GPUs (no GPU needed)."""
    import subprocess
    import sys
    import tempfile

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tempfile.gettempdir())
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("triton's ptxas is unavailable on this machine")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_cuda_extension_binds_the_gram_kernel():
    # nvcc compiled csrc/cuda/gram.cu into shortllm._cuda (it cannot run here: no GPU)
    from shortllm.ops import _backend

    if not _backend.available_backends()["cuda"]:
        pytest.skip("shortllm._cuda not built (no nvcc)")
    from shortllm import _cuda

    assert "gram_stats" in _cuda.OPS and callable(_cuda.gram_stats)
