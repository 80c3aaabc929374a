"""CPU backend: the `shortllm._cpu` C++/OpenMP extension (csrc/cpu), called with raw pointers.

Importing this module fails (and the dispatcher falls back to the reference, warning once) when the
extension was not built. Inputs of a dtype the kernels do not cover (e.g. float64) go to the reference.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _cpu  # noqa: F401 - ImportError here means "extension not built"
from . import _backend
from .cross_entropy import chunk_rows_for

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_VOCAB_CHUNK = 8192  # vocabulary rows upcast per step: bounds the float32 weight copy


_PARALLEL_MIN_BYTES = 32 << 20


def _threads(nbytes: int = 1 << 62) -> int:
    """torch's intra-op setting (one knob for both; results never depend on it), but a single thread below
    32 MB: one core already streams such an input at memory speed (~25 GB/s here), while an OpenMP team
    pays wake-up and barrier costs that explode when another process holds a core (measured 20x slower
    for a 9 MB block output on a loaded 2-core machine)."""
    return 1 if nbytes < _PARALLEL_MIN_BYTES else max(1, torch.get_num_threads())


def _ref(op: str) -> Callable:
    return _backend._REF[op]


def _cpu_ok(*ts: Optional[Tensor]) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype in DTYPE_CODES) for t in ts)


def cosine_stats(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    if not _cpu_ok(x, y) or x.dtype != y.dtype or acc.device.type != "cpu":
        return _ref("cosine_stats")(x, y, mask, acc)
    x, y = _backend.kernel_rows(x, y)
    mask = _backend.kernel_mask(mask, x.device)
    out = acc if acc.is_contiguous() else torch.zeros(3, dtype=torch.float64)
    n, d = x.shape
    _cpu.cosine_stats(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), n, d, DTYPE_CODES[x.dtype],
                      0 if mask is None else mask.data_ptr(), out.data_ptr(),
                      _threads(2 * n * d * x.element_size()))
    if out is not acc:
        acc.add_(out)


def cosine_span_stats(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    """One fused pass: each row of y is read once and its |y|^2 summed once for all k inputs (k <= 16 per
    pass; csrc groups more). Bit-identical to k `cosine_stats` calls: same lanes, blocks and slot order.
    Threads: `_threads` of the bytes the call reads ((k + 1) * N * D * itemsize): for SmolLM2 (k = 8, 42 MB a
    call) a team of `torch.get_num_threads()`; on a quiet 2-core machine that took one batch's 240 spans from
    62 ms to 39 ms (on a loaded machine a team can stall instead: benchmarks/bench_cosine_span.py)."""
    if not _cpu_ok(y, *xs) or any(x.dtype != y.dtype for x in xs) or acc.device.type != "cpu":
        return _ref("cosine_span_stats")(xs, y, mask, acc)
    k = len(xs)
    if k == 0:
        return
    if y.stride(-1) != 1 and y.shape[-1] > 1:
        y = y.contiguous()
    xs = [x.contiguous() if x.stride(-1) != 1 and x.shape[-1] > 1 else x for x in xs]
    if mask is not None:
        mask = mask.reshape(-1).to(torch.bool).contiguous()
    # a [k, 3] view with contiguous rows (e.g. a diagonal of the scorer's accumulator) is written in place
    out = acc if acc.stride(-1) == 1 else torch.zeros(k, 3, dtype=torch.float64)
    table = torch.tensor([x.data_ptr() for x in xs] + [x.stride(0) for x in xs], dtype=torch.int64)
    n, d = y.shape
    _cpu.cosine_span_stats(table.data_ptr(), k, y.data_ptr(), y.stride(0), n, d, DTYPE_CODES[y.dtype],
                           0 if mask is None else mask.data_ptr(), out.data_ptr(), out.stride(0),
                           _threads((k + 1) * n * d * y.element_size()))
    if out is not acc:
        acc.add_(out)


def taylor_stats(w: Tensor, g: Optional[Tensor], acc: Tensor) -> None:
    if not _cpu_ok(w, g) or acc.device.type != "cpu":
        return _ref("taylor_stats")(w, g, acc)
    if g is not None and g.dtype != w.dtype:
        # mixed precision (e.g. bf16 weight, fp32 grad): widen both rather than round the wider one
        w, g = w.float(), g.float()
    w = w.detach().contiguous()
    g = None if g is None else g.detach().contiguous()
    out = acc if acc.is_contiguous() else torch.zeros(3, dtype=torch.float64)
    _cpu.taylor_stats(w.data_ptr(), 0 if g is None else g.data_ptr(), w.numel(), DTYPE_CODES[w.dtype],
                      out.data_ptr(), _threads((1 if g is None else 2) * w.numel() * w.element_size()))
    if out is not acc:
        acc.add_(out)


def lm_head_nll_fwd(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, softcap: float,
                    scale: float, ignore_index: int, chunk_rows: int) -> tuple[Tensor, Tensor]:
    """Vocabulary chunks outermost (each weight chunk is widened to float32 once), row chunks inside:
    BLAS computes the chunk's logits, the kernel applies scale/softcap, updates the online
    log-sum-exp and picks the target logit in one pass. Peak extra memory: one logits chunk."""
    if not _cpu_ok(h, weight, bias):
        return _ref("lm_head_nll_fwd")(h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows)
    n, v = h.shape[0], weight.shape[0]
    with torch.no_grad():
        hf = h.detach().float().contiguous()
        tg = targets.to(torch.long).contiguous()
        m = torch.full((n,), float("-inf"), dtype=torch.float32)
        s = torch.zeros(n, dtype=torch.float32)
        t = torch.full((n,), float("nan"), dtype=torch.float32)  # stays NaN for an out-of-range target
        vc = min(v, _VOCAB_CHUNK)
        rows = chunk_rows_for(n, vc, chunk_rows)
        buf = torch.empty(min(rows, n) * vc, dtype=torch.float32)
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            wc = weight.detach()[v0:v1].float()
            bc = None if bias is None else bias.detach()[v0:v1].float()
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                z = buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
                if bc is None:
                    torch.mm(hf[r0:r1], wc.T, out=z)
                else:
                    torch.addmm(bc, hf[r0:r1], wc.T, out=z)
                _cpu.lse_update(z.data_ptr(), r1 - r0, v1 - v0, v1 - v0, v0, tg[r0:].data_ptr(), float(scale),
                                float(softcap or 0.0), m[r0:].data_ptr(), s[r0:].data_ptr(), t[r0:].data_ptr(),
                                _threads())
        nll = torch.empty(n, dtype=torch.float32)
        lse = torch.empty(n, dtype=torch.float32)
        _cpu.nll_finalize(m.data_ptr(), s.data_ptr(), t.data_ptr(), tg.data_ptr(), int(ignore_index), n,
                          nll.data_ptr(), lse.data_ptr())
    return nll, lse


def gram_stats(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    """Tiles of 64 valid rows widened to float64 once, each thread owning fixed output rows (csrc/cpu/gram.cpp):
    bit-identical for any thread count. The op does 4 D multiply-adds per element read, so the team is sized
    by N * D^2 (its arithmetic) rather than by the bytes read: a single thread below ~3e7 of them."""
    if not _cpu_ok(x, y) or x.dtype != y.dtype or xtx.device.type != "cpu" or xty.device.type != "cpu":
        return _ref("gram_stats")(x, y, mask, xtx, xty)
    x, y = _backend.kernel_rows(x, y)
    mask = _backend.kernel_mask(mask, x.device)
    n, d = x.shape
    _cpu.gram_stats(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), n, d, DTYPE_CODES[x.dtype],
                    0 if mask is None else mask.data_ptr(), xtx.data_ptr(), xty.data_ptr(),
                    _threads(n * d * d))


def _on_cpu(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


IMPLS: dict[str, Callable] = {
    "cosine_stats": cosine_stats,
    "cosine_stats:supports": _on_cpu,
    "cosine_span_stats": cosine_span_stats,
    "cosine_span_stats:supports": _on_cpu,
    "taylor_stats": taylor_stats,
    "taylor_stats:supports": _on_cpu,
    "lm_head_nll_fwd": lm_head_nll_fwd,
    "lm_head_nll_fwd:supports": _on_cpu,
    "gram_stats": gram_stats,
    "gram_stats:supports": _on_cpu,
}
