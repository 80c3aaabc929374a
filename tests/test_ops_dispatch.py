"""Dispatch, determinism and torch.library integration of the fused ops (all backends on CPU)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch

from shortllm.errors import BackendError
from shortllm.ops import _backend, cosine_stats_, lm_head_nll, select, taylor_stats_

HAS_CPU = _backend.available_backends()["cpu"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="shortllm._cpu not built")


def _xy(n=1000, d=577, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d + 3, generator=g).to(dtype)[:, :d]
    y = (0.5 * x.float() + torch.randn(n, d, generator=g)).to(dtype)
    return x, y


@needs_cpu
def test_cpu_tensors_default_to_cpu_extension(monkeypatch):
    monkeypatch.delenv("SHORTLLM_BACKEND", raising=False)
    for op in ("cosine_stats", "taylor_stats", "lm_head_nll_fwd"):
        assert select(op, torch.device("cpu"))[0] == "cpu", op


@pytest.mark.parametrize("name", ["ref", "cpu", "triton"])
def test_forcing_a_backend(monkeypatch, name):
    if name == "cpu" and not HAS_CPU:
        pytest.skip("shortllm._cpu not built")
    if name == "triton":
        pytest.importorskip("triton")
        import triton.language as tl

        if type(tl.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SHORTLLM_BACKEND", name)
    assert select("cosine_stats", torch.device("cpu"))[0] == name


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("SHORTLLM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        select("cosine_stats", torch.device("cpu"))
    monkeypatch.setenv("SHORTLLM_BACKEND", "cuda")
    x, y = _xy(4, 8)
    with pytest.raises(BackendError):
        cosine_stats_(x, y, None, torch.zeros(3, dtype=torch.float64))


def _cos_bits(x, y, mask):
    acc = torch.zeros(3, dtype=torch.float64)
    cosine_stats_(x, y, mask, acc)
    return acc


def _taylor_bits(w, g):
    acc = torch.zeros(3, dtype=torch.float64)
    taylor_stats_(w, g, acc)
    return acc


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=lambda d: str(d)[6:])
def test_cpu_bit_identical_across_runs_and_threads(monkeypatch, dtype):
    monkeypatch.setenv("SHORTLLM_BACKEND", "cpu")
    x, y = _xy(3001, 577, dtype)
    mask = torch.rand(3001, generator=torch.Generator().manual_seed(1)) < 0.7
    w, g = _xy(700, 999, dtype, seed=2)
    prev = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            runs.append((_cos_bits(x, y, mask), _taylor_bits(w, g)))
    finally:
        torch.set_num_threads(prev)
    for c, t in runs[1:]:
        assert torch.equal(c, runs[0][0]), f"cosine not bit-identical: {c} vs {runs[0][0]}"
        assert torch.equal(t, runs[0][1]), f"taylor not bit-identical: {t} vs {runs[0][1]}"


@needs_cpu
def test_cpu_extension_thread_argument_is_bit_neutral():
    from shortllm import _cpu

    x, y = _xy(4097, 300, torch.float32)
    outs = []
    for nt in (1, 2, 3):
        acc = torch.zeros(3, dtype=torch.float64)
        _cpu.cosine_stats(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), 4097, 300, 0, 0, acc.data_ptr(), nt)
        outs.append(acc)
    assert all(torch.equal(o, outs[0]) for o in outs), outs


def test_triton_deterministic(monkeypatch):
    pytest.importorskip("triton")
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SHORTLLM_BACKEND", "triton")
    x, y = _xy(300, 129)
    assert torch.equal(_cos_bits(x, y, None), _cos_bits(x, y, None))
    assert torch.equal(_taylor_bits(x, y), _taylor_bits(x, y))


@pytest.mark.parametrize("name", ["ref", "cpu"])
def test_opcheck(monkeypatch, name):
    if name == "cpu" and not HAS_CPU:
        pytest.skip("shortllm._cpu not built")
    monkeypatch.setenv("SHORTLLM_BACKEND", name)
    x, y = _xy(33, 40, torch.float32)
    mask = torch.arange(33) % 2 == 0
    ops = torch.ops.shortllm
    torch.library.opcheck(ops.cosine_stats_.default, (x, y, mask, torch.zeros(3, dtype=torch.float64)))
    torch.library.opcheck(ops.cosine_stats_.default, (x, y, None, torch.zeros(3, dtype=torch.float64)))
    torch.library.opcheck(ops.taylor_stats_.default, (x, y, torch.zeros(3, dtype=torch.float64)))
    torch.library.opcheck(ops.taylor_stats_.default, (x, None, torch.zeros(3, dtype=torch.float64)))
    h = torch.randn(9, 40, requires_grad=True)
    w = torch.randn(70, 40)
    t = torch.randint(0, 70, (9,))
    torch.library.opcheck(ops.lm_head_nll_fwd.default, (h, w, None, t, 0.0, 1.0, -100, 4))


@needs_cpu
def test_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("SHORTLLM_BACKEND", "cpu")
    x, y = _xy(50, 64, torch.float32)
    h, w, t = torch.randn(6, 64), torch.randn(30, 64), torch.randint(0, 30, (6,))

    def f(x, y, acc, acc2):
        cosine_stats_(x * 2, y, None, acc)
        taylor_stats_(x, y, acc2)
        return lm_head_nll(h, w, t)

    acc_e, acc_c = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    acc2_e, acc2_c = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    want = f(x, y, acc_e, acc2_e)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, y, acc_c, acc2_c)
    assert torch.equal(acc_c, acc_e) and torch.equal(acc2_c, acc2_e) and torch.allclose(got, want)


def test_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.empty(7, 5), torch.empty(7, 5)
        acc = torch.zeros(3, dtype=torch.float64)
        cosine_stats_(x, y, None, acc)
        taylor_stats_(x, y, acc)
        nll = lm_head_nll(torch.empty(7, 5), torch.empty(11, 5), torch.zeros(7, dtype=torch.long))
        assert nll.shape == (7,) and nll.dtype == torch.float32
