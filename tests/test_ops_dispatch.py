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


# --- a backend that fails to import: one BackendUnavailableWarning with the reason, only when it matters ---

def _break_imports(monkeypatch, *names: str) -> str:
    """Make `shortllm.ops._<name>_backend` fail to import (fresh per test: the loader's caches are reset)."""
    import importlib

    reason = f"planted import failure {'/'.join(names)} #{id(names)}"
    real = importlib.import_module

    def fake(modname, *a, **k):
        if modname in {f"shortllm.ops._{n}_backend" for n in names}:
            raise ImportError(reason)
        return real(modname, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setattr(_backend, "_import_errors", {})
    monkeypatch.setattr(_backend, "_warned", set())
    return reason


def _unavailable(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, _backend.BackendUnavailableWarning)]


def test_backend_unavailable_warning_is_a_userwarning():
    assert issubclass(_backend.BackendUnavailableWarning, UserWarning)


def test_cpu_backend_import_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("SHORTLLM_BACKEND", raising=False)
    reason = _break_imports(monkeypatch, "cpu")
    x, y = _xy(37, 65, torch.float32)
    mask = torch.arange(37) % 3 != 0
    with pytest.warns(_backend.BackendUnavailableWarning) as record:
        for _ in range(3):
            got = _cos_bits(x, y, mask)
            _taylor_bits(x, y)
            lm_head_nll(torch.randn(4, 65), torch.randn(9, 65), torch.randint(0, 9, (4,)))
    msgs = _unavailable(record)
    assert len(msgs) == 1, msgs
    assert "'cpu'" in msgs[0] and reason in msgs[0] and "C++ compiler" in msgs[0], msgs[0]
    # the fallback ran, and it is the reference
    want = torch.zeros(3, dtype=torch.float64)
    _backend._REF["cosine_stats"](x, y, mask, want)
    assert torch.equal(got, want)


def test_forced_backend_import_failure_warns_once_and_raises_with_the_reason(monkeypatch):
    reason = _break_imports(monkeypatch, "triton")
    monkeypatch.setenv("SHORTLLM_BACKEND", "triton")
    x, y = _xy(5, 8, torch.float32)
    with pytest.warns(_backend.BackendUnavailableWarning) as record:
        for _ in range(3):
            with pytest.raises(BackendError, match=reason):
                cosine_stats_(x, y, None, torch.zeros(3, dtype=torch.float64))
    msgs = _unavailable(record)
    assert len(msgs) == 1 and "'triton'" in msgs[0] and reason in msgs[0] and "pip install triton" in msgs[0], msgs


def test_each_failed_backend_warns_once_on_the_cuda_path(monkeypatch):
    # select() only inspects the device's type: no CUDA needed. Triton comes first on CUDA tensors, then the
    # extension; both broken -> the reference, with one warning per backend however often it is asked
    import warnings

    monkeypatch.delenv("SHORTLLM_BACKEND", raising=False)
    reason = _break_imports(monkeypatch, "triton", "cuda")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(4):
            for op in ("cosine_stats", "taylor_stats", "lm_head_nll_fwd"):
                assert select(op, torch.device("cuda", 1))[0] == "ref"
    msgs = sorted(_unavailable(record))
    assert len(msgs) == 2, msgs
    assert "'cuda'" in msgs[0] and "nvcc on PATH" in msgs[0] and reason in msgs[0], msgs[0]
    assert "'triton'" in msgs[1] and "pip install triton" in msgs[1] and reason in msgs[1], msgs[1]


def test_inapplicable_or_merely_probed_backend_does_not_warn(monkeypatch):
    import warnings

    monkeypatch.delenv("SHORTLLM_BACKEND", raising=False)
    _break_imports(monkeypatch, "cuda", "triton")
    x, y = _xy(9, 16, torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        avail = _backend.available_backends()  # a probe, not a use
        _cos_bits(x, y, None)  # CPU tensors: neither the CUDA extension nor Triton would run
        _taylor_bits(x, y)
    assert not avail["cuda"] and not avail["triton"]
    assert _unavailable(record) == [], _unavailable(record)
    assert "planted import failure" in _backend.import_error("cuda")


def test_import_shortllm_never_warns_nor_touches_cuda_with_broken_backends(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None\n"  # `import triton` raises ImportError
        "sys.modules['shortllm._cpu'] = None\n"
        "sys.modules['shortllm._cuda'] = None\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    import shortllm, shortllm.ops\n"
        "import torch\n"
        "from shortllm.ops._backend import BackendUnavailableWarning as W\n"
        "bad = [str(w.message) for w in rec if issubclass(w.category, W)]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized(), 'import initialised CUDA'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# --- every launch runs on its input's device, not on whichever device is current ---

class _DeviceRecorder:
    """Stands in for torch.cuda.device: records which device a launch made current (no CUDA needed)."""

    active: list = []
    entered: list = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        _DeviceRecorder.entered.append(self.device)
        _DeviceRecorder.active.append(self.device)

    def __exit__(self, *exc):
        _DeviceRecorder.active.pop()


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    monkeypatch.setattr(_DeviceRecorder, "active", [])
    monkeypatch.setattr(_DeviceRecorder, "entered", [])
    monkeypatch.setattr(torch.cuda, "device", _DeviceRecorder)
    with _backend.device_guard(torch.device("cuda", 3)):
        assert _DeviceRecorder.active == [torch.device("cuda", 3)]
    assert _DeviceRecorder.active == []
    with _backend.device_guard(torch.device("cpu")):
        pass
    assert _DeviceRecorder.entered == [torch.device("cuda", 3)], "a CPU launch must not touch torch.cuda"


def _guard_spy(monkeypatch):
    seen: list = []
    active: list = []

    class Guard:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            seen.append(self.device)
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    monkeypatch.setattr(_backend, "device_guard", Guard)
    return seen, active


def test_triton_launches_inside_the_inputs_device_guard(monkeypatch):
    pytest.importorskip("triton")
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton imported without TRITON_INTERPRET=1")
    from shortllm.kernels import _jit

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SHORTLLM_BACKEND", "triton")
    seen, active = _guard_spy(monkeypatch)
    launches: list = []
    real_jit = _jit.jit

    class Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kw):
                launches.append(list(active))
                return self.kernel[grid](*args, **kw)
            return run

    monkeypatch.setattr(_jit, "jit", lambda fn: Launch(real_jit(fn)))
    x, y = _xy(20, 33, torch.float32)
    got = _cos_bits(x, y, torch.arange(20) % 2 == 0)
    _taylor_bits(x, y)
    lm_head_nll(torch.randn(3, 33), torch.randn(7, 33), torch.randint(0, 7, (3,)))
    assert len(launches) == 3 and all(a == [x.device] for a in launches), launches
    assert seen == [x.device] * 3
    assert torch.isfinite(got).all()


def test_cuda_extension_calls_run_inside_the_inputs_device_guard(monkeypatch):
    # no GPU here: the extension is replaced by a recorder and the CUDA-only dtype/device check is lifted, so
    # CPU tensors walk the backend's code path; every extension call must see the inputs' device made current
    import types

    try:
        from shortllm.ops import _cuda_backend as cb
    except Exception as exc:  # the extension is optional
        pytest.skip(f"CUDA backend not importable: {exc}")
    seen, active = _guard_spy(monkeypatch)
    calls: list = []

    def record(name):
        def f(*args, **kw):
            calls.append((name, list(active)))
        return f

    ops = ("cosine_stats", "taylor_stats", "lse_update", "nll_finalize")
    fake = types.SimpleNamespace(cosine_slots=lambda n: 1, taylor_slots=lambda n: 1, **{o: record(o) for o in ops})
    monkeypatch.setattr(cb, "_cuda", fake)
    monkeypatch.setattr(cb, "_ok", lambda *ts: True)
    monkeypatch.setattr(cb, "_stream", lambda device: 0)
    x, y = _xy(6, 8, torch.float32)
    cb.cosine_stats(x, y, torch.arange(6) % 2 == 0, torch.zeros(3, dtype=torch.float64))
    cb.taylor_stats(x, y, torch.zeros(3, dtype=torch.float64))
    cb.lm_head_nll_fwd(torch.randn(3, 8), torch.randn(5, 8), None, torch.zeros(3, dtype=torch.long), 0.0, 1.0, -100, 0)
    assert sorted({name for name, _ in calls}) == sorted(ops), calls
    assert all(a == [x.device] for _, a in calls), calls
    assert seen and all(d == x.device for d in seen)
