"""GPU acceptance check: correctness of the CUDA code paths and the performance targets, in one command.

    python benchmarks/gpu_check.py --install   # on the GPU machine: build against its torch, then check
    make gpu-check                              # CI: the same script in CPU mode, at tiny size

Correctness (a failure makes the exit status 1):
  ops         every fused op on CUDA tensors for the `triton` and `cuda` backends against the float64 `_ref`
              computed on the CPU (fp32/bf16/fp16, odd shapes, strided rows, masks, NaN/Inf in padded rows,
              outputs and scratch NaN-poisoned, accumulators starting non-zero or on the CPU)
  e2e_tiny    score_fast (bi/angular/taylor/mag/ppl) of every tiny architecture on the device in fp32 against
              the CPU float64 result, itself checked against shortllm.testing.reference and physical deletion
  device_map  a tiny model spread with accelerate over cuda:0 and the CPU scores like the single-device model
  host_syncs  torch.cuda.set_sync_debug_mode: host syncs per batch do not grow with the number of blocks
  retrain_fsdp  `shortllm retrain` (cpt/kd/partial) under accelerate launch with docs/accelerate/fsdp.yaml on
              one GPU equals one plain process: loss curve and exported weights (CPU mode: the harness with
              accelerate's one-CPU launch)
Performance (recorded, never fails the run): a Llama-3-8B-shaped model with random bf16 weights, 8 x 2048
tokens: BI+angular / forward, Taylor / forward+backward and its peak memory / the seed-000 method's, the
PPL criterion / naive L forwards, fused-op bandwidth / copy bandwidth, fused / unfused batch-1 decode.

Every section is time-boxed against one global deadline (--budget, default 450 s counted from the start,
the install included): a section that no longer fits is skipped with a note, and an alarm stops one that
overruns. Each section records its error instead of crashing the run.

Without CUDA (or with --cpu) the CPU-capable parts run at tiny size (the `cpu` backend and the Triton
kernels under TRITON_INTERPRET=1; the perf sections on a tiny model, their ratios meaningless) and the
GPU-only parts are listed as skipped with the reason. Results: benchmarks/results/gpu.{json,md} on a GPU,
benchmarks/results/gpu_cpu_mode.{json,md} in CPU mode (so a CPU run never overwrites GPU figures), or
under --out DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# set by --install before it re-executes this script: the budget counts the build too
T0 = float(os.environ.get("SHORTLLM_GPU_CHECK_T0", time.time()))

# Llama-3-8B shape (GPU) and the tiny stand-in CPU mode runs the same code on
BIG = {"gpu": dict(layers=32, hidden=4096, inter=14336, heads=32, kv=8, vocab=128256, batch=8, seq=2048,
                   dtype="bfloat16"),
       # float32: bf16 matmuls on a CPU without bf16 instructions are emulated and slow (bf16 is in the op checks)
       "cpu": dict(layers=4, hidden=64, inter=128, heads=4, kv=2, vocab=512, batch=2, seq=32, dtype="float32")}
TARGETS = {  # name: (comparison, bound) on the H200
    "bi_angular_over_forward": ("<=", 1.02),
    "taylor_over_forward_backward": ("<=", 1.05),
    "taylor_peak_over_seed000": ("<=", 0.5),
    "ppl_over_naive": ("<=", 0.56),
    "fused_ops_over_copy_bandwidth": (">=", 0.8),
    "fused_over_unfused_decode": (">=", 1.10),
}


class Skip(Exception):
    """A section (or part) that does not apply here; the message says why."""


class BudgetExceeded(BaseException):
    """Raised by the alarm when the global deadline passes inside a section (BaseException: no
    `except Exception` in the code under test swallows it)."""


# ---- install ------------------------------------------------------------------------------------

def install() -> dict:
    """pip install the project against this machine's torch (no deps, no build isolation, no index: the GPU
    machine has no network), the CUDA extension built for the local compute capability only (one arch
    compiles in a fraction of the default list's time)."""
    env = dict(os.environ)
    # asked in a child: this process then holds no CUDA context (memory) while the check runs
    cap = subprocess.run([sys.executable, "-c", "import torch; print(*torch.cuda.get_device_capability()) "
                          "if torch.cuda.is_available() else None"], capture_output=True, text=True).stdout.split()
    archs = env["SHORTLLM_CUDA_ARCHS"] = "".join(cap) if len(cap) == 2 else env.get("SHORTLLM_CUDA_ARCHS", "80;90")
    env.setdefault("SHORTLLM_BUILD_JOBS", str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", str(REPO)]
    t = time.time()
    out = {"cuda_archs": archs, "attempts": []}
    # first with every extension required, so a compiler error is in the log; if that fails, again without
    # (the Triton backend and the rest still get checked; the missing backend then fails the op checks)
    for require in ("1", "0"):
        # setuptools copies build/lib into the wheel: a stale tree would install deleted modules (as `make venv`)
        subprocess.run(["rm", "-rf", str(REPO / "build")], check=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, SHORTLLM_REQUIRE_EXT=require),
                              cwd=str(REPO))
        log = (proc.stdout + proc.stderr)[-6000:].splitlines()
        out["attempts"].append({"require_ext": require == "1", "returncode": proc.returncode,
                                "log_tail": [ln for ln in log if "shortllm build" in ln or "rror" in ln][-20:]
                                or log[-10:]})
        if proc.returncode == 0:
            break
    out.update(returncode=proc.returncode, seconds=round(time.time() - t, 1))
    return out


# ---- helpers --------------------------------------------------------------------------------------

def left() -> float:
    return DEADLINE - time.time()


def _alarm(_signum, _frame):
    raise BudgetExceeded(f"the {BUDGET:.0f} s budget ran out inside this section")


@contextlib.contextmanager
def forced_backend(name: str | None):
    """SHORTLLM_BACKEND for the duration (read by the dispatcher at every op call)."""
    old = os.environ.get("SHORTLLM_BACKEND")
    if name is None:
        os.environ.pop("SHORTLLM_BACKEND", None)
    else:
        os.environ["SHORTLLM_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SHORTLLM_BACKEND", None)
        else:
            os.environ["SHORTLLM_BACKEND"] = old


def poisoned_empty():
    """The op tests' NaN fill of uninitialised memory (tests/ops_helpers.py), so an output or partial-sum
    slot a kernel never writes shows up as NaN instead of stale memory that happens to look right."""
    sys.path.insert(0, str(REPO / "tests"))
    import ops_helpers

    return ops_helpers.poisoned_empty()


@contextlib.contextmanager
def exact_fp32():
    """No TF32 anywhere: the correctness checks compare fp32 against float64 at fp32 tolerances."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


class Checks:
    """Named pass/fail results of a correctness section; every failure keeps its message."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "ok": bool(ok), **({"detail": detail} if detail else {})})
        return ok

    def run(self, name: str, fn, *args, **kwargs) -> None:
        """Run one check function; an exception is that check's failure, not the section's end."""
        try:
            detail = fn(*args, **kwargs)
            self.add(name, True, detail or "")
        except Skip as e:
            self.items.append({"name": name, "ok": None, "skipped": str(e)})
        except BudgetExceeded:
            raise
        except Exception as e:  # noqa: BLE001 - a check that raises has failed; keep going with the others
            self.add(name, False, f"{type(e).__name__}: {e}"[:600])

    def result(self, **extra) -> dict:
        ran = [c for c in self.items if c["ok"] is not None]
        failed = [c for c in ran if not c["ok"]]
        skipped = [c for c in self.items if c["ok"] is None]
        status = "fail" if failed else ("pass" if ran else "skip")
        out = {"status": status, "n_checks": len(ran), "n_failed": len(failed), "checks": self.items, **extra}
        if failed:
            out["failed"] = [f"{c['name']}: {c.get('detail', '')}" for c in failed][:20]
        if skipped:
            out["skipped_checks"] = [f"{c['name']}: {c['skipped']}" for c in skipped][:20]
        if not ran and skipped:
            out["reason"] = skipped[0]["skipped"]
        return out


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps: int, warmup: int = 1, min_left: float = 0.0) -> dict:
    """Median wall seconds of `fn` over `reps` runs after `warmup` (fewer when the budget runs short)."""
    for _ in range(warmup):
        fn()
    times = []
    for i in range(reps):
        if i > 0 and left() < min_left:
            break
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "runs_s": [round(x, 5) for x in times]}


class Memory:
    """Peak memory of a region: torch.cuda.max_memory_allocated on a GPU; peak RSS (whole process, coarse)
    on the CPU."""

    def __init__(self, dev):
        self.dev = dev

    def start(self) -> None:
        import torch

        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
        else:
            from _common import reset_peak_rss

            reset_peak_rss()
            self.base = _rss_bytes()

    def peak(self) -> dict:
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            peak = torch.cuda.max_memory_allocated(self.dev)
        else:
            from _common import peak_rss_mb

            peak = int(peak_rss_mb() * 2**20)
        return {"peak_bytes": peak, "base_bytes": self.base, "peak_gib": round(peak / 2**30, 3),
                "above_base_gib": round((peak - self.base) / 2**30, 3)}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def target(name: str, value: float | None, gpu: bool) -> dict:
    op, bound = TARGETS[name]
    met = None
    if gpu and value is not None and math.isfinite(value):
        met = value <= bound if op == "<=" else value >= bound
    return {"value": None if value is None else round(value, 4), "target": f"{op} {bound}", "met": met,
            **({} if gpu else {"note": "CPU mode, tiny model: not evaluated"})}


def free(dev) -> None:
    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- correctness: ops --------------------------------------------------------------------------

START = (0.25, -1.5, 3.0)  # accumulators start non-zero: an op must add, not overwrite
COS_ROW_TOL = {"cpu": {"float32": 1e-12, "bfloat16": 2e-6, "float16": 2e-6},  # per row, on cos and angular
               "triton": {"float32": 2e-5, "bfloat16": 2e-5, "float16": 2e-5},  # float32 row sums
               "cuda": {"float32": 1e-9, "bfloat16": 1e-9, "float16": 1e-9}}  # float64 row sums
TAYLOR_REL = {"cpu": (1e-6, 1e-6), "triton": (1e-6, 1e-12), "cuda": (1e-6, 1e-6)}  # (W*G terms, |W|)
CE_ABS = 2e-4  # per row on nll and lse: float32 logits on every backend


def _dtypes():
    import torch

    return (torch.float32, torch.bfloat16, torch.float16)


def _mask(kind: str, n: int, seed: int):
    import torch

    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(n, dtype=torch.bool)
    if kind == "nothing":
        return torch.zeros(n, dtype=torch.bool)
    m = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.6
    m[0] = True
    if n > 1:
        m[-1] = False
    return m


def _plant(t, rows, seed: int, sign: int) -> None:
    """NaN / +-Inf in the given rows of a CPU [N, D] tensor (patterns rotate: one element, whole row)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for i, r in enumerate(rows):
        j = int(torch.randint(0, t.shape[1], (1,), generator=g))
        kind = i % 3
        if kind == 0:
            t[r, j] = float("nan")
        elif kind == 1:
            t[r, j] = sign * float("inf")
        else:
            t[r] = float("nan")


def cosine_case(dev, backend, n, d, dtype, mask_kind, noncontig, seed, plant=False, acc_device=None) -> str:
    import torch

    from shortllm.ops import cosine_stats_, cosine_stats_ref

    g = torch.Generator().manual_seed(seed)
    width = d + 7 if noncontig else d
    xb = torch.randn(n, width, generator=g) + 0.1
    yb = 0.6 * xb + torch.randn(n, width, generator=g)  # correlated rows: cos spread over (-1, 1)
    xb, yb = xb.to(dtype), yb.to(dtype)
    mask = _mask(mask_kind, n, seed)
    if plant:
        assert mask is not None
        pad = (~mask).nonzero().flatten().tolist()
        _plant(xb, pad, seed, -1)
        _plant(yb, pad[1:] + pad[:1], seed + 1, 1)
    # the oracle sees only valid rows (float64, CPU): padded rows must not matter whatever they hold
    sel = slice(None) if mask is None else mask
    want = cosine_stats_ref(xb[:, :d][sel].double(), yb[:, :d][sel].double(), None)
    # strided rows survive the move only if the base moves and is sliced there
    x, y = xb.to(dev)[:, :d], yb.to(dev)[:, :d]
    acc = torch.tensor(START, dtype=torch.float64, device=acc_device or dev)
    with forced_backend(backend), poisoned_empty():
        cosine_stats_(x, y, None if mask is None else mask.to(dev), acc)
    got = acc.cpu() - torch.tensor(START, dtype=torch.float64)
    count = int(want[2])
    if not torch.isfinite(got).all():
        raise AssertionError(f"non-finite sums {got.tolist()} (a padded row or an unwritten slot leaked)")
    if got[2].item() != count:
        raise AssertionError(f"count {got[2].item()} != {count}")
    tol = COS_ROW_TOL[backend][str(dtype)[6:]] * max(1, count) + 1e-12
    err = (got[:2] - want[:2]).abs().max().item()
    if err > tol:
        raise AssertionError(f"|err| {err:.3g} > tol {tol:.3g}")
    return f"err {err:.2g}"


def gram_case(dev, backend, n, d, dtype, mask_kind, noncontig, seed, plant=False) -> str:
    """gram_ (healing's x^T x, x^T y in float64) into pre-filled device accumulators against gram_ref on the
    CPU: products of widened inputs are exact in float64, so only the summation order may differ."""
    import torch

    from shortllm.ops import gram_, gram_ref

    g = torch.Generator().manual_seed(seed)
    width = d + 3 if noncontig else d
    xb = torch.randn(n, width, generator=g).to(dtype)
    yb = (torch.randn(n, width, generator=g) * 3 + 1).to(dtype)
    mask = _mask(mask_kind, n, seed)
    if plant:
        pad = (~mask).nonzero().flatten().tolist()
        _plant(xb, pad, seed, -1)
        _plant(yb, pad[1:] + pad[:1], seed + 1, 1)
    want_a, want_b = gram_ref(xb[:, :d], yb[:, :d], mask)
    start = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    a, b = start[0].clone().to(dev), start[1].clone().to(dev)
    x, y = xb.to(dev)[:, :d], yb.to(dev)[:, :d]
    with forced_backend(backend), poisoned_empty():
        gram_(x, y, None if mask is None else mask.to(dev), a, b)
    got_a, got_b = a.cpu() - start[0], b.cpu() - start[1]
    if not (torch.isfinite(got_a).all() and torch.isfinite(got_b).all()):
        raise AssertionError("non-finite sums (a padded row or an unwritten slot leaked)")
    sel = slice(None) if mask is None else mask
    xa, ya = xb[:, :d][sel].double().abs(), yb[:, :d][sel].double().abs()
    rel = max(1e-12, 8 * n * 2.2e-16)
    worst = 0.0
    for got, want, scale in ((got_a, want_a, xa.T @ xa), (got_b, want_b, xa.T @ ya)):
        excess = (got - want).abs() - (scale * rel + 1e-14)
        if (excess > 0).any():
            raise AssertionError(f"|err| {(got - want).abs().max().item():.3g} beyond {rel:.1g} x sum|products|")
        worst = max(worst, float(((got - want).abs() / (scale + 1e-300)).max()))
    return f"rel err {worst:.2g}"


def span_case(dev, backend, k, n, d, dtype, seed, mask_kind="some") -> str:
    """cosine_span_stats_ (every span ending at one block output in one call) into an anti-diagonal view of a
    bigger accumulator, as the scorer passes it: each row must get its pair's sums, nothing else may change."""
    import torch

    from shortllm.ops import cosine_span_stats_, cosine_stats_ref

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g)
    xs = [(0.3 * (i + 1) * y + torch.randn(n, d, generator=g)).to(dtype) for i in range(k)]
    y = y.to(dtype)
    mask = _mask(mask_kind, n, seed)
    big = torch.randn(k, k + 2, 3, dtype=torch.float64, generator=g)
    s0, s1, s2 = big.stride()
    view = lambda t: t.as_strided((k, 3), (s0 - s1, s2), t.storage_offset() + (k - 1) * s1)  # noqa: E731
    want = big.clone()
    view(want).add_(torch.stack([cosine_stats_ref(x, y, mask) for x in xs]))
    acc = big.to(dev)
    with forced_backend(backend), poisoned_empty():
        cosine_span_stats_([x.to(dev) for x in xs], y.to(dev), None if mask is None else mask.to(dev), view(acc))
    got = acc.cpu()
    off = torch.ones_like(big, dtype=torch.bool)
    view(off).fill_(False)
    if not torch.equal(got[off], big[off]):
        raise AssertionError("an accumulator entry outside the span rows changed")
    count = int(want[0, k - 1, 2] - big[0, k - 1, 2])
    tol = COS_ROW_TOL[backend][str(dtype)[6:]] * max(1, count) + 1e-12
    err = (view(got) - view(want)).abs().max().item()
    if not torch.equal(view(got)[:, 2], view(want)[:, 2]) or err > tol:
        raise AssertionError(f"|err| {err:.3g} > tol {tol:.3g} (or a count differs)")
    return f"err {err:.2g}"


def cosine_nan_propagates(dev, backend) -> str:
    """The other half of the padding contract: a NaN in a row that counts must reach the sums."""
    import torch

    from shortllm.ops import cosine_stats_

    x = torch.randn(40, 65, generator=torch.Generator().manual_seed(8))
    y = torch.randn(40, 65, generator=torch.Generator().manual_seed(9))
    mask = _mask("some", 40, 8)
    x[int(mask.nonzero()[-1])] = float("nan")
    acc = torch.zeros(3, dtype=torch.float64, device=dev)
    with forced_backend(backend):
        cosine_stats_(x.to(dev), y.to(dev), mask.to(dev), acc)
    acc = acc.cpu()
    if not (torch.isnan(acc[0]) and torch.isnan(acc[1]) and acc[2].item() == mask.sum().item()):
        raise AssertionError(f"a NaN in a valid row must propagate: {acc.tolist()}")


def taylor_case(dev, backend, shape, dtype, seed, noncontig=False, gdtype=None, with_g=True,
                acc_device=None) -> str:
    import torch

    from shortllm.ops import taylor_stats_, taylor_stats_ref

    g = torch.Generator().manual_seed(seed)
    full = tuple(shape[:-1]) + (shape[-1] + 5,) if noncontig else tuple(shape)
    wb = (torch.randn(full, generator=g) * 0.02).to(dtype)
    gb = (torch.randn(full, generator=g) * 1e-3).to(gdtype or dtype)
    cut = (..., slice(0, shape[-1]))
    want = taylor_stats_ref(wb[cut], gb[cut] if with_g else None)
    w, gr = wb.to(dev)[cut], gb.to(dev)[cut]
    acc = torch.tensor(START, dtype=torch.float64, device=acc_device or dev)
    with forced_backend(backend), poisoned_empty():
        taylor_stats_(w, gr if with_g else None, acc)
    got = acc.cpu() - torch.tensor(START, dtype=torch.float64)
    rel_wg, rel_w = TAYLOR_REL[backend]
    scale = want[1].item()
    errs = [abs(got[0] - want[0]).item(), abs(got[1] - want[1]).item(), abs(got[2] - want[2]).item()]
    tols = [rel_wg * scale + 1e-14, rel_wg * scale + 1e-14, rel_w * want[2].item() + 1e-14]
    if not all(e <= t for e, t in zip(errs, tols)):
        raise AssertionError(f"got {got.tolist()} want {want.tolist()}")
    if not with_g and (got[0].item() != 0.0 or got[1].item() != 0.0):
        raise AssertionError(f"g=None must add nothing to the Taylor terms: {got.tolist()}")
    return f"rel err {max(errs[1] / max(scale, 1e-300), errs[2] / max(want[2].item(), 1e-300)):.2g}"


def taylor_fp16_underflow(dev, backend) -> str:
    """|w*g| ~ 1e-9 is below fp16's range: the products must be formed in float32."""
    import torch

    from shortllm.ops import taylor_stats_, taylor_stats_ref

    r = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    w = (torch.full((1000,), 3e-5) * (1 + r)).half()
    gr = (torch.full((1000,), 4e-5) * (2 - r)).half()
    acc = torch.zeros(3, dtype=torch.float64, device=dev)
    with forced_backend(backend):
        taylor_stats_(w.to(dev), gr.to(dev), acc)
    want = taylor_stats_ref(w, gr)
    got = acc.cpu()
    if not (got[1].item() > 0.5 * want[1].item() and abs(got[1] - want[1]).item() <= 1e-6 * want[1].item()):
        raise AssertionError(f"fp16 products underflowed: got {got.tolist()} want {want.tolist()}")


def ce_case(dev, backend, n, v, d, dtype, seed, bias=False, softcap=0.0, scale=1.0, chunk=0, plant=False) -> str:
    import torch

    from shortllm.ops import lm_head_nll_ref

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    ignored = torch.zeros(n, dtype=torch.bool)
    if n > 2:
        ignored[1::5] = True
        t[ignored] = -100
    if plant:  # an ignored row (padding) may hold anything
        _plant(h, ignored.nonzero().flatten().tolist(), seed, 1)
    want = lm_head_nll_ref(h, w, t, b, softcap, scale)
    z = torch.where(ignored[:, None], 0.0, h.double()) @ w.double().T + (0 if b is None else b.double())
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want_lse = torch.logsumexp(z, -1)
    with forced_backend(backend), poisoned_empty():
        nll, lse = torch.ops.shortllm.lm_head_nll_fwd(h.to(dev), w.to(dev), None if b is None else b.to(dev),
                                                      t.to(dev), softcap, scale, -100, chunk)
    nll, lse = nll.cpu().double(), lse.cpu().double()
    ok = ~ignored
    if not (torch.isfinite(nll).all() and torch.isfinite(lse[ok]).all()):
        raise AssertionError("an output element was not written (NaN from the poisoned allocation)")
    if not (nll[ignored] == 0).all():
        raise AssertionError("ignored rows must have nll 0")
    err = (nll - want).abs().max().item()
    lse_err = (lse[ok] - want_lse[ok]).abs().max().item()
    if err > CE_ABS or lse_err > CE_ABS * (1 + want_lse.abs().max().item() / 10):
        raise AssertionError(f"|nll err| {err:.3g}, |lse err| {lse_err:.3g} > {CE_ABS}")
    return f"nll err {err:.2g}"


def section_ops(ctx) -> dict:
    import torch

    from shortllm import ops as _ops
    from shortllm.ops import _backend

    dev, gpu = ctx["device"], ctx["gpu"]
    F32, BF16, F16 = _dtypes()
    checks = ctx["checks"] = Checks()
    backends = ("triton", "cuda") if gpu else ("cpu", "triton")
    if not gpu:
        checks.items.append({"name": "cuda backend", "ok": None, "skipped": "needs a CUDA device"})
    if gpu:
        cos_shapes = [(1, 1), (3, 577), (129, 4097), (4097, 64), (2049, 4096), (33, 8191)]
        tay_shapes = [(1,), (3, 5), (129, 577), (4097, 64), (64, 4096), (2, 3, 577), (4096, 14336)]
        ce_cases = [(1, 50, 1, False, 0.0, 1.0, 0), (3, 1000, 64, True, 0.0, 1.0, 2),
                    (129, 1000, 577, False, 30.0, 1.0, 0), (129, 8200, 64, True, 0.0, 0.5, 50),
                    (37, 300, 577, True, 5.0, 2.0, 7), (1000, 32773, 256, False, 0.0, 1.0, 0)]
    else:  # the interpreter runs ~5 ms per program: tiny shapes, every code path still
        cos_shapes = [(1, 1), (3, 65), (37, 129)]
        tay_shapes = [(1,), (3, 5), (2, 3, 65)]
        ce_cases = [(1, 50, 1, False, 0.0, 1.0, 0), (9, 300, 64, True, 30.0, 0.5, 4)]
    masks = ("none", "some", "all", "nothing")
    for backend in backends:
        avail = _backend.available_backends().get(backend)
        if not avail:
            why = f"backend {backend} unavailable ({_backend.import_error(backend)})"
            if gpu:
                checks.add(f"{backend}: import", False, why)
            else:
                checks.items.append({"name": f"{backend}", "ok": None, "skipped": why})
            continue
        i = 0
        for (n, d) in cos_shapes:
            for dt in (F32, BF16, F16):
                mk = masks[i % 4]
                checks.run(f"{backend} cosine {n}x{d} {str(dt)[6:]} mask={mk}", cosine_case, dev, backend, n, d, dt,
                           mk, i % 2 == 0, seed=n * 7 + d + i)
                i += 1
            if left() < 5:
                raise BudgetExceeded("budget ran out in the op checks")
        for dt in (F32, BF16, F16):
            n, d = cos_shapes[-1]
            checks.run(f"{backend} cosine NaN/Inf in padded rows {n}x{d} {str(dt)[6:]}", cosine_case, dev, backend,
                       n, d, dt, "some", True, seed=77, plant=True)
        checks.run(f"{backend} cosine NaN in a valid row propagates", cosine_nan_propagates, dev, backend)
        if hasattr(_ops, "cosine_span_stats_"):
            for k, (n, d) in zip((1, 3, 8), cos_shapes[-3:]):
                for dt in (F32, BF16, F16):
                    checks.run(f"{backend} cosine spans k={k} {n}x{d} {str(dt)[6:]}", span_case, dev, backend, k, n,
                               d, dt, seed=k + n, mask_kind=("some", "none", "all")[k % 3])
        if gpu:  # the kernels must not write through a pointer of another device
            checks.run(f"{backend} cosine, accumulator on the CPU", cosine_case, dev, backend, 129, 577, BF16, "some",
                       True, seed=5, acc_device=torch.device("cpu"))
        for j, shape in enumerate(tay_shapes):
            for dt in (F32, BF16, F16):
                checks.run(f"{backend} taylor {'x'.join(map(str, shape))} {str(dt)[6:]}", taylor_case, dev, backend,
                           shape, dt, seed=sum(shape) + j, noncontig=len(shape) > 1)
        for dt in (F32, BF16, F16):
            checks.run(f"{backend} taylor g=None {str(dt)[6:]}", taylor_case, dev, backend, tay_shapes[-1], dt, seed=4,
                       with_g=False)
        checks.run(f"{backend} taylor bf16 weight, fp32 grad", taylor_case, dev, backend, (65, 300), BF16, seed=9,
                   gdtype=F32)
        checks.run(f"{backend} taylor fp16 products do not underflow", taylor_fp16_underflow, dev, backend)
        if gpu:
            checks.run(f"{backend} taylor, accumulator on the CPU", taylor_case, dev, backend, (129, 577), BF16, seed=6,
                       acc_device=torch.device("cpu"))
        for n, v, d, bias, cap, sc, chunk in ce_cases:
            for dt in (F32, BF16, F16):
                checks.run(f"{backend} lm_head_nll n={n} v={v} d={d} bias={bias} softcap={cap} {str(dt)[6:]}",
                           ce_case, dev, backend, n, v, d, dt, seed=n + v + d, bias=bias, softcap=cap, scale=sc,
                           chunk=chunk)
        if hasattr(_ops, "gram_"):
            gram_shapes = [(1, 1), (3, 65), (129, 577), (4097, 64), (2049, 1024)] if gpu else [(1, 1), (3, 65),
                                                                                               (37, 129)]
            for j, (n, d) in enumerate(gram_shapes):
                for q, dt in enumerate((F32, BF16, F16)):
                    mk = masks[(j + q) % 4]
                    checks.run(f"{backend} gram {n}x{d} {str(dt)[6:]} mask={mk}", gram_case, dev, backend, n, d, dt, mk,
                               j % 2 == 1, seed=n + d + j)
            n, d = gram_shapes[-1]
            checks.run(f"{backend} gram NaN/Inf in padded rows {n}x{d}", gram_case, dev, backend, n, d, BF16, "some",
                       True, seed=12, plant=True)
        n, v, d = (129, 1000, 577) if gpu else (9, 300, 64)
        checks.run(f"{backend} lm_head_nll NaN/Inf in ignored rows", ce_case, dev, backend, n, v, d, BF16, seed=3,
                   plant=True)
    return checks.result(backends=list(backends))


# ---- correctness: tiny architectures end to end -------------------------------------------------

METRICS5 = ("bi", "angular", "taylor", "mag", "ppl")
# (rtol, atol relative to the largest |value|) of a device fp32 score against the CPU float64 one: fp32
# rounding of the model itself dominates; Taylor sums signed products over batches before the abs.
E2E_TOL = {"bi": (2e-4, 1e-5), "angular": (2e-4, 1e-5), "mag": (1e-5, 1e-7), "ppl": (2e-4, 1e-7),
           "taylor": (2e-3, 1e-4)}


def _tiny():
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    return tiny_models


def _e2e_data(tm):
    # two right-padded batches of different shapes; 19 tokens > the tiny sliding windows (8)
    return [tm.random_batch(3, 19, seed=11), tm.random_batch(2, 10, seed=12)]


def compare_scores(got: dict, want: dict, tol=E2E_TOL, scale_rtol: float = 1.0) -> str:
    import torch

    worst = []
    for m, w in want.items():
        a, b = got[m].double().cpu(), w.double().cpu()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            raise AssertionError(f"{m}: NaN pattern differs")
        fin = ~torch.isnan(b)
        rtol, atol = tol[m]
        rtol *= scale_rtol
        atol = atol * scale_rtol * b[fin].abs().max().item()
        diff = (a[fin] - b[fin]).abs()
        bound = atol + rtol * b[fin].abs()
        if not bool((diff <= bound).all()):
            i = int((diff - bound).argmax())
            raise AssertionError(f"{m}: |diff| {diff[i].item():.3g} at {i} > {bound[i].item():.3g} "
                                 f"(got {a[fin][i].item():.6g}, want {b[fin][i].item():.6g})")
        worst.append(f"{m} {(diff / b[fin].abs().clamp_min(1e-30)).max().item():.1g}")
    return "max rel diff: " + ", ".join(worst)


def validate_oracle(tm, arch: str, data) -> str:
    """The CPU float64 score_fast result the device runs are compared with is itself checked against the
    independent implementations (every hidden state / full gradients; physical deletion for ppl)."""
    import torch

    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.ppl import delete_blocks_copy, mean_nll_full
    from shortllm.testing.reference import score_reference

    m64 = tm.make_tiny(arch, num_layers=4, seed=3, dtype=torch.float64)
    with forced_backend("ref"):
        got = score_fast(m64, data, metrics=METRICS5, n_max=3, progress=False).values
    want = score_reference(m64, data, metrics=("bi", "angular", "taylor", "mag"), n_max=3)
    want["ppl"] = torch.tensor([math.exp(mean_nll_full(delete_blocks_copy(m64, [i]), data)) for i in range(4)],
                               dtype=torch.float64)
    return compare_scores(got, want, {k: (1e-9, 1e-12) for k in METRICS5})


def e2e_arch(tm, arch: str, dev, backends, data) -> list[tuple[str, object]]:
    """[(check name, thunk)]: the oracle is computed once per architecture, each backend compared with it."""
    import torch

    from shortllm.scoring.engine import score_fast

    m64 = tm.make_tiny(arch, num_layers=4, seed=3, dtype=torch.float64)
    with forced_backend("ref"):
        want = score_fast(m64, data, metrics=METRICS5, n_max=3, progress=False).values
    model = tm.make_tiny(arch, num_layers=4, seed=3, dtype=torch.float32).to(dev)

    def one(backend):
        with forced_backend(backend), exact_fp32():
            got = score_fast(model, data, metrics=METRICS5, n_max=3, progress=False).values
        return compare_scores(got, want)
    return [(f"{arch} on {dev.type} [{b}] vs CPU float64", (lambda b=b: one(b))) for b in backends]


def section_e2e(ctx) -> dict:
    dev, gpu = ctx["device"], ctx["gpu"]
    tm = _tiny()
    data = _e2e_data(tm)
    checks = ctx["checks"] = Checks()
    archs = tm.TINY_ARCHS if gpu else ("llama", "gemma2")  # gemma2: soft-capped logits in the ppl head
    backends = ("triton", "cuda") if gpu else ("cpu",)
    checks.run("oracle: CPU float64 score_fast == reference implementations (llama)", validate_oracle, tm, "llama",
               data)
    for arch in archs:
        if left() < 10:
            checks.items.append({"name": f"{arch} and later", "ok": None, "skipped": "time budget"})
            break
        try:
            cases = e2e_arch(tm, arch, dev, backends, data)
        except Exception as e:  # noqa: BLE001 - the oracle of one architecture failing is that check's failure
            checks.add(f"{arch}: oracle", False, f"{type(e).__name__}: {e}"[:600])
            continue
        for name, fn in cases:
            checks.run(name, fn)
    return checks.result(archs=list(archs), backends=list(backends))


# ---- correctness: a model spread with device_map -------------------------------------------------

def _device_map(model, cuda_blocks, n_blocks: int) -> dict:
    dm = {"model.embed_tokens": 0, "model.norm": 0, "lm_head": 0}
    if getattr(model.model, "rotary_emb", None) is not None:
        dm["model.rotary_emb"] = 0
    for i in range(n_blocks):
        dm[f"model.layers.{i}"] = 0 if i in cuda_blocks else "cpu"
    return dm


def section_device_map(ctx) -> dict:
    if not ctx["gpu"]:
        raise Skip("needs a CUDA device (the multi-device logic is unit-tested on `meta` tensors in "
                   "tests/test_gpu_check.py)")
    import torch
    from accelerate import dispatch_model

    from shortllm.errors import MetricError
    from shortllm.scoring.engine import score_fast

    tm = _tiny()
    data = _e2e_data(tm)
    checks = ctx["checks"] = Checks()
    base = tm.make_tiny("llama", num_layers=4, seed=3)
    with exact_fp32():
        single = copy.deepcopy(base).to("cuda")
        want = score_fast(single, data, metrics=METRICS5, n_max=3, progress=False).values
    del single

    def split_execution():
        # main_device="cpu": accelerate runs the "cpu" blocks on the CPU (not offloaded to cuda:0), so the
        # residual stream crosses devices at every block: cuda, cpu, cuda, cpu, then the norm on cuda
        model = dispatch_model(copy.deepcopy(base), device_map=_device_map(base, (0, 2), 4), main_device="cpu")
        seen = []
        hook = model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(
            (o[0] if isinstance(o, tuple) else o).device.type))
        try:
            with exact_fp32():
                got = score_fast(model, data, metrics=METRICS5, n_max=3, progress=False).values
        finally:
            hook.remove()
        if "cpu" not in seen:
            raise AssertionError(f"block 1 did not run on the CPU ({seen}): the check would be vacuous")
        # CPU and CUDA fp32 kernels round differently: fp32-level agreement, not bitwise
        return compare_scores(got, want, scale_rtol=0.5)

    def offloaded():
        # the transformers default: "cpu" entries are offloaded (weights on meta, run on cuda:0)
        model = dispatch_model(copy.deepcopy(base), device_map=_device_map(base, (0, 3), 4))
        with exact_fp32():
            got = score_fast(model, data, metrics=("bi", "angular", "mag", "ppl"), n_max=3, progress=False).values
        detail = compare_scores(got, {k: v for k, v in want.items() if k != "taylor"}, scale_rtol=0.1)
        try:
            score_fast(model, data, metrics=("taylor",), progress=False)
        except MetricError:
            return detail + "; taylor refused with MetricError (offloaded weights get no gradient)"
        raise AssertionError("taylor on offloaded blocks must raise MetricError")

    checks.run("device_map cuda:0 + cpu (split execution), 5 metrics == single device", split_execution)
    checks.run("device_map cuda:0 + cpu (offloaded), bi/angular/mag/ppl == single device", offloaded)
    free(torch.device("cuda"))
    return checks.result()


# ---- correctness: host syncs per batch -----------------------------------------------------------

def count_syncs(fn) -> int:
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def section_syncs(ctx) -> dict:
    if not ctx["gpu"]:
        raise Skip("torch.cuda.set_sync_debug_mode needs a CUDA device (tests/test_gpu_check.py runs the per-block "
                   "hot path on `meta` tensors, where any host sync raises)")
    from shortllm.scoring.engine import score_fast

    tm = _tiny()
    checks = ctx["checks"] = Checks()
    counts: dict = {}

    def per_batch(metrics, layers):
        model = tm.make_tiny("llama", num_layers=layers, seed=1).to("cuda")
        batches = [tm.random_batch(2, 24, seed=s) for s in range(4)]
        score_fast(model, batches[:1], metrics=metrics, progress=False)  # compile kernels, warm the allocator
        c2 = count_syncs(lambda: score_fast(model, batches[:2], metrics=metrics, progress=False))
        c4 = count_syncs(lambda: score_fast(model, batches, metrics=metrics, progress=False))
        return c2, c4, (c4 - c2) / 2  # per batch: the run's fixed cost (finish, fingerprint) cancels

    for metrics in (("bi", "angular", "taylor"), ("ppl",), METRICS5):
        key = "+".join(metrics)

        def check(metrics=metrics, key=key):
            a, b = per_batch(metrics, 4), per_batch(metrics, 8)
            counts[key] = {"4 blocks (2 batches, 4 batches, per batch)": a, "8 blocks": b}
            if b[2] > a[2]:
                raise AssertionError(f"{a[2]:g} syncs per batch with 4 blocks but {b[2]:g} with 8: a per-block sync")
            return f"{a[2]:g} host syncs per batch, independent of depth"
        checks.run(f"host syncs per batch do not grow with depth: {key}", check)
    return checks.result(counts=counts)


# ---- correctness: retraining under FSDP -----------------------------------------------------------

FSDP_METHODS = ("cpt", "kd", "partial")  # LoRA under FSDP is refused (use DDP)
FSDP_TOL = 1e-4  # relative, losses and final weights: one rank, so only kernel choice differs


def _retrain_cli(launcher: list[str], args: list[str], out: Path, env: dict) -> dict:
    proc = subprocess.run([*launcher, "-m", "shortllm.cli.app", "retrain", *args, "-o", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=max(10, int(left()) - 5), cwd=out.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(launcher[-4:])} ... retrain` exited {proc.returncode}: {proc.stderr[-1200:]}")
    return json.loads((out / "retrain.json").read_text())


def _max_rel(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) if a.numel() else 0.0


def _fsdp_compare(checks: Checks, tmp: Path, gpu: bool) -> None:
    from safetensors.torch import load_file

    tm = _tiny()
    import retrain_helpers  # tests/, on the path after _tiny()

    src, teacher, corpus = tmp / "student", tmp / "teacher", tmp / "corpus.txt"
    for path, seed in ((src, 0), (teacher, 1)):
        tm.make_tiny("llama", seed=seed).save_pretrained(str(path))
        retrain_helpers.char_tokenizer().save_pretrained(str(path))
    corpus.write_text(retrain_helpers.toy_corpus(200))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    if gpu:
        launcher, want = accel + ["--config_file", str(REPO / "docs" / "accelerate" / "fsdp.yaml"),
                                  "--main_process_port", "29531"], "FSDP"
        device = ["--device", "cuda"]
    else:
        launcher, want, device = accel + ["--cpu"], "NO", []
    w0 = load_file(str(src / "model.safetensors"))
    for method in FSDP_METHODS:
        args = [str(src), "--method", method, "--data", str(corpus), "--steps", "4", "--batch-size", "2",
                "--seq-len", "32", "--lr", "3e-3", "--warmup", "1", *device]
        args += ["--teacher", str(teacher)] if method == "kd" else []

        def compare(method=method, args=args):
            one = _retrain_cli([sys.executable], args, tmp / f"{method}_one", env)
            par = _retrain_cli(launcher, args, tmp / f"{method}_launched", env)
            if par.get("parallel") != want:
                raise AssertionError(f"the launch ran {par.get('parallel')}, not {want}")
            if len(par["losses"]) != len(one["losses"]) or not one["losses"]:
                raise AssertionError(f"loss curves of different lengths: {par['losses']} vs {one['losses']}")
            loss_rel = _max_rel(par["losses"], one["losses"])
            wa = load_file(str(tmp / f"{method}_launched" / "model" / "model.safetensors"))
            wb = load_file(str(tmp / f"{method}_one" / "model" / "model.safetensors"))
            if wa.keys() != wb.keys():
                raise AssertionError(f"exported tensors differ: {sorted(set(wa) ^ set(wb))[:5]}")
            w_rel = max(float((wa[k].double() - wb[k].double()).abs().max() / wb[k].double().abs().max()
                              .clamp_min(1e-12)) for k in wb)
            moved = max(float((wb[k].double() - w0[k].double()).abs().max()) for k in wb if k in w0)
            detail = (f"{want}: {len(one['losses'])} losses max rel diff {loss_rel:.1e}, final weights max rel "
                      f"diff {w_rel:.1e} (training moved them by up to {moved:.2e})")
            if loss_rel > FSDP_TOL or w_rel > FSDP_TOL or moved == 0.0:
                raise AssertionError(detail)
            return detail

        checks.run(f"retrain {method}: launched ({want}) == one process", compare)


def section_retrain_fsdp(ctx) -> dict:
    """`accelerate launch --config_file docs/accelerate/fsdp.yaml` against one plain process, per method: the
    same loss curve and final weights. One GPU allows one FSDP rank (NCCL refuses two ranks on one device);
    that still runs FSDP2's per-block wrapping, the loss hook reading the head weight FSDP gathered, and the
    full-state gather for the export. Without CUDA the same harness runs accelerate's one-CPU launch
    (accelerate enables FSDP only on accelerators; tests/test_retrain_fsdp.py checks that refusal)."""
    import tempfile

    checks = ctx["checks"] = Checks()
    with tempfile.TemporaryDirectory(prefix="shortllm_fsdp_") as d:  # removed even when the alarm stops us
        _fsdp_compare(checks, Path(d), ctx["gpu"])
    return checks.result()


# ---- performance ---------------------------------------------------------------------------------

def big_model(ctx):
    """Llama-3-8B-shaped LlamaForCausalLM with random bf16 weights, built on the device (cached)."""
    import torch
    import transformers as tf

    if "big" in ctx:
        return ctx["big"]
    s, dev = ctx["size"], ctx["device"]
    cfg = tf.LlamaConfig(num_hidden_layers=s["layers"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
                         max_position_embeddings=max(8192, s["seq"]), tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    t = time.time()
    prev = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(getattr(torch, s["dtype"]))
        with dev:
            model = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(10, s["vocab"], (s["batch"], s["seq"]), generator=g, device=dev)
    ctx["big"] = (model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    ctx["big_build_s"] = round(time.time() - t, 1)
    return ctx["big"]


def _shape_note(ctx) -> str:
    s = ctx["size"]
    return (f"Llama shape {s['layers']} blocks, hidden {s['hidden']}, intermediate {s['inter']}, "
            f"{s['heads']}/{s['kv']} heads, vocab {s['vocab']}, {s['dtype']} random weights, {s['batch']} x {s['seq']} "
            "tokens")


def section_perf_bi_angular(ctx) -> dict:
    import torch

    from shortllm.scoring.engine import score_fast

    model, batch = big_model(ctx)
    dev, gpu = ctx["device"], ctx["gpu"]
    reps = 3 if gpu else 1

    def forward():
        with torch.no_grad():
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def score():
        score_fast(model, [batch], metrics=("bi", "angular"), progress=False)

    f = timed(forward, dev, reps, warmup=1 if gpu else 0, min_left=30)
    s = timed(score, dev, reps, warmup=1 if gpu else 0, min_left=30)
    ratio = s["median_s"] / f["median_s"]
    out = {"status": "measured", "model": _shape_note(ctx), "forward": f, "score_fast_bi_angular": s,
           "targets": {"bi_angular_over_forward": target("bi_angular_over_forward", ratio, gpu)}}
    if gpu:  # the whole call on one batch: per-batch syncs plus the run's fixed ones (fingerprint, results)
        out["host_syncs_one_batch_run"] = count_syncs(score)
    return out


def _set_block_grads(model, on: bool) -> dict:
    from shortllm.model.adapters import get_adapter

    flags = {id(p): p.requires_grad for p in model.parameters()}
    ad = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if on:
        for blk in ad.blocks():
            for _, p in ad.block_weights(blk):
                p.requires_grad_(True)
    return flags


def _restore_grads(model, flags: dict) -> None:
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), p.requires_grad))
        p.grad = None


def section_perf_taylor(ctx) -> dict:
    import torch

    from shortllm.scoring.engine import score_fast
    from shortllm.testing.reference import taylor_reference

    model, batch = big_model(ctx)
    dev, gpu = ctx["device"], ctx["gpu"]
    # one sequence per batch: the baseline and the seed-000 method keep every activation for backward, and
    # 8 x 2048 tokens of Llama-8B activations at once do not fit next to the seed-000 method's float64 copies
    batches = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    mem = Memory(dev)
    out: dict = {"status": "measured", "model": _shape_note(ctx) + " (as 1-sequence batches)"}

    def forward_backward():
        flags = _set_block_grads(model, True)  # the weights Taylor differentiates, nothing else
        try:
            for b in batches:
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"],
                             use_cache=False).loss
                loss.backward()
        finally:
            _restore_grads(model, flags)

    def ours(**kw):
        return lambda: score_fast(model, batches, metrics=("taylor",), progress=False, **kw)

    runs = [("score_fast taylor (exact)", ours()),
            ("forward+backward (HF loss, block weights)", forward_backward)]
    if gpu:  # the same code with other options: measured where the numbers mean something
        runs[1:1] = [("score_fast taylor (exact, gradient_checkpointing)", ours(gradient_checkpointing=True)),
                     ("score_fast taylor (streaming)", ours(taylor_mode="streaming"))]
    for name, fn in runs:
        if left() < 40:
            out.setdefault("skipped", []).append(f"{name}: time budget")
            continue
        try:
            if gpu:
                fn()  # warm-up (kernel compilation), outside the memory window
                free(dev)
            mem.start()
            t = timed(fn, dev, 2 if gpu else 1, warmup=0, min_left=40)
            out[name] = {**t, **mem.peak()}
        except torch.OutOfMemoryError as e:
            out[name] = {"error": f"OutOfMemoryError: {str(e)[:200]}"}
        free(dev)
    name = "seed-000 (all grads + float64 salience copies)"
    if left() < 40:
        out.setdefault("skipped", []).append(f"{name}: time budget")
    else:
        try:
            mem.start()
            t0 = time.perf_counter()
            taylor_reference(model, batches)
            sync(dev)
            out[name] = {"seconds": round(time.perf_counter() - t0, 3), **mem.peak()}
        except torch.OutOfMemoryError as e:
            out[name] = {"error": f"OutOfMemoryError: {str(e)[:200]}"}
        finally:
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(True)
            free(dev)
    ex, fb, seed = (out.get("score_fast taylor (exact)", {}), out.get("forward+backward (HF loss, block weights)", {}),
                    out.get(name, {}))
    ck = out.get("score_fast taylor (exact, gradient_checkpointing)", {})
    t_ratio = ex["median_s"] / fb["median_s"] if "median_s" in ex and "median_s" in fb else None
    m_ratio = ex["peak_bytes"] / seed["peak_bytes"] if "peak_bytes" in ex and "peak_bytes" in seed else None
    out["targets"] = {"taylor_over_forward_backward": target("taylor_over_forward_backward", t_ratio, gpu),
                      "taylor_peak_over_seed000": target("taylor_peak_over_seed000", m_ratio, gpu)}
    if "peak_bytes" in ck and "peak_bytes" in seed:
        out["checkpointed_peak_over_seed000"] = round(ck["peak_bytes"] / seed["peak_bytes"], 4)
    return out


def section_perf_ppl(ctx) -> dict:
    import torch

    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.ppl import removal_ppl_naive

    model, batch = big_model(ctx)
    dev, gpu = ctx["device"], ctx["gpu"]
    data = [batch]
    score_fast(model, [{k: v[:1, :64] for k, v in batch.items()}], metrics=("ppl",), progress=False)  # compile
    sync(dev)
    t = time.perf_counter()
    ours = score_fast(model, data, metrics=("ppl",), progress=False).values["ppl"]
    sync(dev)
    t_ours = time.perf_counter() - t
    if left() < 1.5 * t_ours * 2:
        return {"status": "measured", "ppl_criterion_s": round(t_ours, 3),
                "skipped": ["naive L forwards: time budget (needs about 2x the criterion's time)"],
                "targets": {"ppl_over_naive": target("ppl_over_naive", None, gpu)}}
    t = time.perf_counter()
    # float64 log-softmax over the model's own (bf16) logits: the naive method exactly as users run it
    naive = removal_ppl_naive(model, data)
    sync(dev)
    t_naive = time.perf_counter() - t
    rel = ((ours - naive).abs() / naive).max().item()
    # bf16 logits in the naive path vs float32 logits in the criterion's head: 1e-2 relative is that rounding;
    # a replay bug (wrong block skipped, wrong mask) moves a block's ppl by far more
    same = bool(rel <= 1e-2) and torch.equal(torch.isfinite(ours), torch.isfinite(naive))
    out = {"status": "measured" if same else "fail", "model": _shape_note(ctx), "ppl_criterion_s": round(t_ours, 3),
           "naive_s": round(t_naive, 3), "max_rel_diff": rel, "scores_equal_rtol_1e-2": same,
           "targets": {"ppl_over_naive": target("ppl_over_naive", t_ours / t_naive, gpu)}}
    if not same:
        out["reason"] = f"ppl criterion differs from naive deletion: max rel diff {rel:.3g}"
    return out


def _bandwidth(fn, nbytes: int, dev, reps: int) -> float:
    t = timed(fn, dev, reps, warmup=2)
    return nbytes / t["median_s"] / 1e9


def _bandwidth_rows(dtype, backends, dev, nbytes: int, reps: int) -> list[dict]:
    """copy_ bandwidth (read + write) of `nbytes`, then each fused op reading `nbytes`, as a share of it."""
    import torch

    from shortllm import ops
    from shortllm.ops import cosine_stats_, taylor_stats_

    esize = torch.empty(0, dtype=dtype).element_size()
    src = torch.empty(nbytes // esize, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    copy_bw = _bandwidth(lambda: dst.copy_(src), 2 * nbytes, dev, reps)
    src = dst = None  # freed before the op inputs are allocated
    rows = [{"op": "copy", "dtype": str(dtype)[6:], "gbs": round(copy_bw, 1)}]
    n = nbytes // 2 // (4096 * esize)
    x = torch.randn(n, 4096, device=dev, dtype=dtype)
    y = torch.randn(n, 4096, device=dev, dtype=dtype)
    mask = torch.rand(n, device=dev) < 0.9
    acc = torch.zeros(3, dtype=torch.float64, device=dev)
    for b in backends:
        with forced_backend(b):
            for op, fn in (("cosine_stats_", lambda: cosine_stats_(x, y, mask, acc)),
                           ("taylor_stats_", lambda: taylor_stats_(x, y, acc))):
                bw = _bandwidth(fn, nbytes, dev, reps)
                rows.append({"op": op, "backend": b, "dtype": str(dtype)[6:], "gbs": round(bw, 1),
                             "over_copy": round(bw / copy_bw, 3)})
    x = y = None
    span = getattr(ops, "cosine_span_stats_", None)
    if span is not None:  # the 8 spans ending at one block output: 9 tensors read once each when fused
        k = 8
        n = nbytes // (k + 1) // (4096 * esize)
        ys = torch.randn(n, 4096, device=dev, dtype=dtype)
        xs = [torch.randn(n, 4096, device=dev, dtype=dtype) for _ in range(k)]
        accs = torch.zeros(k, 3, dtype=torch.float64, device=dev)
        m = mask[:n]
        for b in backends:
            with forced_backend(b):
                bw = _bandwidth(lambda: span(xs, ys, m, accs), (k + 1) * n * 4096 * esize, dev, reps)
            rows.append({"op": f"cosine_span_stats_ (k={k})", "backend": b, "dtype": str(dtype)[6:],
                         "gbs": round(bw, 1), "over_copy": round(bw / copy_bw, 3)})
    return rows


def section_perf_ops(ctx) -> dict:
    import torch

    from shortllm.ops import _backend, lm_head_nll

    dev, gpu = ctx["device"], ctx["gpu"]
    nbytes = (1 << 30) if gpu else (16 << 20)  # the op reads this much (x and y, or W and G)
    reps = 20 if gpu else 5
    backends = [b for b in (("triton", "cuda") if gpu else ("cpu",)) if _backend.available_backends().get(b)]
    out: dict = {"status": "measured", "input_bytes": nbytes, "rows": []}
    for dtype in (torch.bfloat16, torch.float32):
        out["rows"] += _bandwidth_rows(dtype, backends, dev, nbytes, reps)
        free(dev)
    shares = [r["over_copy"] for r in out["rows"] if "over_copy" in r]
    worst = min(shares) if shares else None
    # the LM-head cross-entropy is a GEMM (compute-bound): its throughput, not a bandwidth
    n, v, d = (4096, 128256, 4096) if gpu else (256, 2048, 128)
    h = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(v, d, device=dev, dtype=torch.bfloat16) * 0.02
    t = torch.randint(0, v, (n,), device=dev)
    for b in backends:
        with forced_backend(b):
            s = timed(lambda: lm_head_nll(h, w, t), dev, max(3, reps // 4), warmup=1)["median_s"]
        out["rows"].append({"op": "lm_head_nll (forward)", "backend": b, "dtype": "bfloat16",
                            "tflops": round(2 * n * v * d / s / 1e12, 3)})
    out["targets"] = {"fused_ops_over_copy_bandwidth": target("fused_ops_over_copy_bandwidth", worst, gpu)}
    out["note"] = "target value = the worst op/backend/dtype"
    return out


def section_perf_decode(ctx) -> dict:
    import torch

    from shortllm.pruning.fusion import TOLERANCE, fuse
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.removal import prune

    model, _ = big_model(ctx)
    dev, gpu = ctx["device"], ctx["gpu"]
    L = model.config.num_hidden_layers
    k = max(1, L // 4)
    plan = make_plan(None, model=model, blocks=list(range(L - 2 - k, L - 2)))
    ctx.pop("big")  # pruned in place below: later sections must not reuse it
    pruned = prune(model, plan, inplace=True)
    fused = fuse(pruned)
    new = 64 if gpu else 4
    reps = 3 if gpu else 1
    ids = torch.randint(10, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)

    def gen(m, n):
        with torch.inference_mode():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, use_cache=True)

    res = {}
    for name, m in (("unfused", pruned), ("fused", fused)):
        if gpu:
            gen(m, 2)  # warm-up
        one = timed(lambda m=m: gen(m, 1), dev, reps, warmup=0)["median_s"]
        full = timed(lambda m=m: gen(m, new + 1), dev, reps, warmup=0)["median_s"]
        res[name] = {"s_per_token": (full - one) / new, "tokens_per_s": new / max(full - one, 1e-9)}
    with torch.inference_mode():
        a = pruned(ids).logits.float()
        b = fused(ids).logits.float()
    rtol, atol = TOLERANCE[getattr(torch, ctx["size"]["dtype"])]
    speed = res["fused"]["tokens_per_s"] / res["unfused"]["tokens_per_s"]
    del fused, pruned, model
    free(dev)
    return {"status": "measured", "model": _shape_note(ctx) + f", {k} blocks removed, batch 1, 32-token prompt, "
            f"{new} new tokens", "decode": res, "logits_max_abs_diff": (a - b).abs().max().item(),
            "logits_close": bool(torch.allclose(a, b, rtol=rtol, atol=atol)),
            "targets": {"fused_over_unfused_decode": target("fused_over_unfused_decode", speed, gpu)}}


# ---- runner --------------------------------------------------------------------------------------

# name, kind, estimated GPU seconds (skipped when less is left), function
SECTIONS = [
    ("ops", "correctness", 90, section_ops),
    ("e2e_tiny", "correctness", 60, section_e2e),
    ("device_map", "correctness", 20, section_device_map),
    ("host_syncs", "correctness", 20, section_syncs),
    ("retrain_fsdp", "correctness", 60, section_retrain_fsdp),
    ("perf_ops_bandwidth", "performance", 15, section_perf_ops),
    ("perf_bi_angular", "performance", 45, section_perf_bi_angular),
    ("perf_ppl", "performance", 60, section_perf_ppl),
    ("perf_taylor", "performance", 60, section_perf_taylor),
    ("perf_fused_decode", "performance", 40, section_perf_decode),
]


def run_section(name: str, kind: str, est: float, fn, ctx: dict) -> dict:
    t = time.time()
    rec: dict = {"kind": kind}
    ctx["checks"] = None
    if ctx["only"] and name not in ctx["only"]:
        rec.update(status="skip", reason="not selected (--sections)")
        return rec
    if ctx.get("broken"):
        rec.update(status="skip", reason=ctx["broken"])
        return rec
    need = est if ctx["gpu"] else 1
    if left() < need:
        rec.update(status="skip", reason=f"time budget: {max(0, left()):.0f} s left of {BUDGET:.0f} s, the section "
                                         f"needs about {need:.0f} s")
        return rec
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(left())))
    try:
        rec.update(fn(ctx))
    except Skip as e:
        rec.update(status="skip", reason=str(e))
    except BudgetExceeded as e:
        # not a failed check: what ran is kept, and the section says it is incomplete
        partial = ctx.get("checks")
        if partial is not None:
            rec.update(partial.result())
        rec.update(status="fail" if rec.get("n_failed") else "incomplete", reason=str(e))
    except Exception as e:  # noqa: BLE001 - one section's crash is recorded, the others still run
        rec.update(status="fail" if kind == "correctness" else "error", reason=f"{type(e).__name__}: {e}"[:800],
                   traceback=traceback.format_exc()[-3000:])
    finally:
        signal.alarm(0)
        free(ctx["device"])
    rec["seconds"] = round(time.time() - t, 1)
    return rec


def environment(ctx, install_info) -> dict:
    import torch
    import transformers

    import shortllm
    from shortllm.ops import _backend

    env = {"status": "info", "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "shortllm_file": shortllm.__file__,
           "cuda_available": torch.cuda.is_available(), "mode": "gpu" if ctx["gpu"] else "cpu",
           "backends": _backend.available_backends(),
           "backend_import_errors": {b: _backend.import_error(b) for b in ("cpu", "triton", "cuda")
                                     if _backend.import_error(b)},
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    for mod in ("triton", "accelerate", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[mod] = None
    if ctx["gpu"]:
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    if install_info:
        env["install"] = install_info
    return env


def _details_md(sections: dict) -> list[str]:
    """The measurements behind each ratio (times, peaks, bandwidths), one short block per section."""
    out = []

    def t(d):
        return f"{d['median_s']:.4g} s" if "median_s" in d else d.get("error", "-")

    s = sections.get("perf_bi_angular", {})
    if "forward" in s:
        syncs = s.get("host_syncs_one_batch_run")
        out += [f"- BI+angular: score_fast {t(s['score_fast_bi_angular'])} vs base_model forward {t(s['forward'])}"
                + ("" if syncs is None else f"; {syncs} host syncs in a one-batch score_fast call")]
    s = sections.get("perf_taylor", {})
    for k, v in s.items():
        if isinstance(v, dict) and k != "targets":
            peak = f", peak {v['peak_gib']} GiB" if "peak_gib" in v else ""
            secs = t(v) if "median_s" in v or "error" in v else f"{v.get('seconds')} s"
            out.append(f"- Taylor, {k}: {secs}{peak}")
    s = sections.get("perf_ppl", {})
    if "ppl_criterion_s" in s:
        rel = s.get("max_rel_diff")
        out.append(f"- PPL criterion {s['ppl_criterion_s']} s vs naive {s.get('naive_s', '-')} s, max rel diff of "
                   f"the scores {'-' if rel is None else format(rel, '.2g')}")
    for r in sections.get("perf_ops_bandwidth", {}).get("rows", []):
        what = f"{r['gbs']} GB/s" + (f" ({r['over_copy']} of copy)" if "over_copy" in r else "") if "gbs" in r \
            else f"{r['tflops']} TFLOP/s"
        out.append(f"- {r['op']} [{r.get('backend', 'torch')}] {r['dtype']}: {what}")
    s = sections.get("perf_fused_decode", {})
    if "decode" in s:
        out.append(f"- batch-1 decode: unfused {s['decode']['unfused']['tokens_per_s']:.1f} tok/s, fused "
                   f"{s['decode']['fused']['tokens_per_s']:.1f} tok/s; logits close: {s['logits_close']}")
    for k, v in sections.get("host_syncs", {}).get("counts", {}).items():
        out.append(f"- host syncs, {k}: {v}")
    return ["", "## Measurements", ""] + out if out else []


def render_md(res: dict) -> str:
    lines = [f"# GPU check ({res['mode']} mode)", "", f"Measured {res['stamp_line']}.", ""]
    if res["mode"] == "cpu":
        lines += ["No CUDA device: the CPU-capable parts ran at tiny size (perf ratios on a tiny model mean "
                  "nothing; targets are not evaluated); GPU-only parts are listed as skipped.", ""]
    env = res["sections"]["environment"]
    if env.get("device"):
        lines += [f"Device: {env['device']} (sm {env['capability']}, {env['memory_gib']} GiB), CUDA {env['cuda']}, "
                  f"triton {env.get('triton')}.", ""]
    lines += ["| section | kind | status | seconds | summary |", "|---|---|---|---|---|"]
    for name, s in res["sections"].items():
        if name == "environment" and s.get("status") != "fail":
            continue
        summary = s.get("reason") or (f"{s['n_checks'] - s['n_failed']}/{s['n_checks']} checks passed"
                                      if "n_checks" in s else "")
        lines.append(f"| {name} | {s['kind']} | {s['status']} | {s.get('seconds', '')} | {summary} |")
    lines += ["", "## Targets", "", "| target | value | bound | met |", "|---|---|---|---|"]
    for name, t in res["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['target']} | {t['met']} |")
    lines += _details_md(res["sections"])
    failed = [(n, f) for n, s in res["sections"].items() for f in s.get("failed", [])]
    if failed:
        lines += ["", "## Failed checks", ""] + [f"- {n}: {f}" for n, f in failed]
    skipped = [(n, s["reason"]) for n, s in res["sections"].items() if s.get("status") == "skip"]
    skipped += [(n, x) for n, s in res["sections"].items() for x in s.get("skipped_checks", []) + s.get("skipped", [])]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {n}: {r}" for n, r in skipped]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global DEADLINE, BUDGET
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--install", action="store_true",
                   help="pip install the project (--no-deps --no-build-isolation) against this python's torch first")
    p.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything, the install included")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--sections", default="", help="comma-separated subset of: " + ",".join(s[0] for s in SECTIONS))
    args = p.parse_args(argv)
    BUDGET = args.budget
    DEADLINE = T0 + BUDGET

    install_info = None
    if args.install:
        install_info = install()
        print(f"gpu_check: install {'ok' if install_info['returncode'] == 0 else 'FAILED'} in "
              f"{install_info['seconds']} s (SHORTLLM_CUDA_ARCHS={install_info['cuda_archs']})", flush=True)
        env = dict(os.environ, SHORTLLM_GPU_CHECK_T0=str(T0),
                   SHORTLLM_GPU_CHECK_INSTALL=json.dumps(install_info))
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--install"]
        # a fresh interpreter imports the package just installed (with its compiled extensions)
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest], env=env).returncode
    if os.environ.get("SHORTLLM_GPU_CHECK_INSTALL"):
        install_info = json.loads(os.environ["SHORTLLM_GPU_CHECK_INSTALL"])

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if gpu:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        # triton fixes interpreter mode when first imported: before anything imports it
        os.environ["TRITON_INTERPRET"] = "1"
    dev = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if not gpu:
        torch.set_num_threads(1)  # tiny sizes: an OpenMP team only adds wake-ups, worst on a shared CPU
    ctx = {"gpu": gpu, "device": dev, "size": BIG["gpu" if gpu else "cpu"],
           "only": {s.strip() for s in args.sections.split(",") if s.strip()}}
    warnings.filterwarnings("ignore", message=".*TRITON_INTERPRET.*")

    from _common import stamp, stamp_dict

    res = {"mode": "gpu" if gpu else "cpu", "budget_s": BUDGET, "stamp": stamp_dict(), "stamp_line": stamp(),
           "sections": {}}
    try:
        res["sections"]["environment"] = {"kind": "info", **environment(ctx, install_info)}
    except Exception as e:  # noqa: BLE001 - e.g. the package did not install: nothing else can run
        res["sections"]["environment"] = {"kind": "info", "status": "fail", "reason": f"{type(e).__name__}: {e}",
                                          "install": install_info}
        ctx["broken"] = f"shortllm does not import ({type(e).__name__}: {e})"
    if install_info and install_info["returncode"] != 0:
        res["sections"]["environment"].update(status="fail", reason="pip install failed (see install.attempts)")
    for name, kind, est, fn in SECTIONS:
        print(f"gpu_check: {name} ... ({max(0, left()):.0f} s left)", flush=True)
        rec = run_section(name, kind, est, fn, ctx)
        res["sections"][name] = rec
        print(f"gpu_check: {name}: {rec['status']} ({rec.get('seconds', 0)} s)"
              + (f" - {rec['reason']}" if rec.get("reason") else ""), flush=True)
    res["targets"] = {k: v for s in res["sections"].values() for k, v in s.get("targets", {}).items()}
    for k in TARGETS:
        res["targets"].setdefault(k, {"value": None, "target": f"{TARGETS[k][0]} {TARGETS[k][1]}", "met": None,
                                      "note": "not measured"})
    res["elapsed_s"] = round(time.time() - T0, 1)
    bad = [n for n, s in res["sections"].items() if s.get("status") == "fail"]
    res["correctness_ok"] = not bad
    res["failed_sections"] = bad

    out_dir = Path(args.out) if args.out else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if gpu else "gpu_cpu_mode"
    md = render_md(res)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"gpu_check: wrote {out_dir / stem}.json and .md in {res['elapsed_s']} s; "
          f"{'all correctness checks passed' if not bad else 'FAILED: ' + ', '.join(bad)}")
    return 1 if bad else 0


DEADLINE = T0 + 450.0
BUDGET = 450.0

if __name__ == "__main__":
    sys.exit(main())
