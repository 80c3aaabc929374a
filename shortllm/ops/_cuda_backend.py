"""CUDA backend: the `shortllm._cuda` extension (csrc/cuda), called with raw device pointers and the
current stream's handle. Never initialises CUDA at import; used only for CUDA tensors (by default the
Triton backend comes first; SHORTLLM_BACKEND=cuda selects this one).

The kernels launch on the current device, so every call runs under `device_guard(input.device)` with that
device's stream. An accumulator on another device (another GPU, or the CPU) gets the result through a
scratch on the inputs' device: a kernel never writes through a pointer of a different device."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _cuda  # noqa: F401 - ImportError here means "extension not built"
from . import _backend
from .cross_entropy import chunk_rows_for

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_VOCAB_CHUNK = 32768


def _ok(*ts: Optional[Tensor]) -> bool:
    return all(t is None or (t.device.type == "cuda" and t.dtype in DTYPE_CODES) for t in ts)


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _out_for(acc: Tensor, device: torch.device) -> Tensor:
    """Where the kernel may add its sums: `acc` itself, or a zeroed scratch on the inputs' device."""
    if acc.is_contiguous() and acc.device == device:
        return acc
    return torch.zeros(3, dtype=torch.float64, device=device)


def cosine_stats(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    if not _ok(x, y) or x.dtype != y.dtype:
        return _backend._REF["cosine_stats"](x, y, mask, acc)
    x, y = _backend.kernel_rows(x, y)
    mask = _backend.kernel_mask(mask, x.device)
    n, d = x.shape
    out = _out_for(acc, x.device)
    part = torch.empty(3 * max(1, _cuda.cosine_slots(n)), dtype=torch.float64, device=x.device)
    with _backend.device_guard(x.device):
        _cuda.cosine_stats(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), n, d, DTYPE_CODES[x.dtype],
                           0 if mask is None else mask.data_ptr(), out.data_ptr(), part.data_ptr(),
                           _stream(x.device))
    if out is not acc:
        acc.add_(out.to(acc.device))


def cosine_span_stats(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    # Not fused: one cosine_stats launch pair per x (y is re-read k times; on a GPU the launches are
    # asynchronous and y mostly stays in L2). Same sums as k cosine_stats calls.
    for i, x in enumerate(xs):
        cosine_stats(x, y, mask, acc[i])


def taylor_stats(w: Tensor, g: Optional[Tensor], acc: Tensor) -> None:
    if not _ok(w, g):
        return _backend._REF["taylor_stats"](w, g, acc)
    if g is not None and g.dtype != w.dtype:
        w, g = w.float(), g.float()
    w = w.detach().contiguous()
    g = None if g is None else g.detach().contiguous()
    out = _out_for(acc, w.device)
    part = torch.empty(3 * max(1, _cuda.taylor_slots(w.numel())), dtype=torch.float64, device=w.device)
    with _backend.device_guard(w.device):
        _cuda.taylor_stats(w.data_ptr(), 0 if g is None else g.data_ptr(), w.numel(), DTYPE_CODES[w.dtype],
                           out.data_ptr(), part.data_ptr(), _stream(w.device))
    if out is not acc:
        acc.add_(out.to(acc.device))


def lm_head_nll_fwd(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, softcap: float,
                    scale: float, ignore_index: int, chunk_rows: int) -> tuple[Tensor, Tensor]:
    """cuBLAS (via torch) computes each float32 logits chunk; the kernel fuses scale, soft-cap, online
    log-sum-exp and the target gather over it."""
    if not _ok(h, weight, bias):
        return _backend._REF["lm_head_nll_fwd"](h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows)
    n, v = h.shape[0], weight.shape[0]
    dev, st = h.device, _stream(h.device)
    with torch.no_grad(), _backend.device_guard(dev):
        hf = h.detach().float().contiguous()
        tg = targets.to(torch.long).contiguous()
        m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        s = torch.zeros(n, dtype=torch.float32, device=dev)
        t = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
        vc = min(v, _VOCAB_CHUNK)
        rows = chunk_rows_for(n, vc, chunk_rows)
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            wc = weight.detach()[v0:v1].float()
            bc = None if bias is None else bias.detach()[v0:v1].float()
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                z = torch.nn.functional.linear(hf[r0:r1], wc, bc).contiguous()
                _cuda.lse_update(z.data_ptr(), r1 - r0, v1 - v0, v1 - v0, v0, tg[r0:].data_ptr(), float(scale),
                                 float(softcap or 0.0), m[r0:].data_ptr(), s[r0:].data_ptr(), t[r0:].data_ptr(), st)
        nll = torch.empty(n, dtype=torch.float32, device=dev)
        lse = torch.empty(n, dtype=torch.float32, device=dev)
        _cuda.nll_finalize(m.data_ptr(), s.data_ptr(), t.data_ptr(), tg.data_ptr(), int(ignore_index), n,
                           nll.data_ptr(), lse.data_ptr(), st)
    return nll, lse


def gram_stats(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    if not _ok(x, y) or x.dtype != y.dtype:
        return _backend._REF["gram_stats"](x, y, mask, xtx, xty)
    x, y = _backend.kernel_rows(x, y)
    mask = _backend.kernel_mask(mask, x.device)
    n, d = x.shape
    a = xtx if xtx.device == x.device else torch.zeros_like(xtx, device=x.device)
    b = xty if xty.device == x.device else torch.zeros_like(xty, device=x.device)
    with _backend.device_guard(x.device):
        _cuda.gram_stats(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), n, d, DTYPE_CODES[x.dtype],
                         0 if mask is None else mask.data_ptr(), a.data_ptr(), b.data_ptr(), _stream(x.device))
    if a is not xtx:
        xtx.add_(a.to(xtx.device))
    if b is not xty:
        xty.add_(b.to(xty.device))


def _on_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


IMPLS: dict[str, Callable] = {
    "cosine_stats": cosine_stats,
    "cosine_stats:supports": _on_cuda,
    "cosine_span_stats": cosine_span_stats,
    "cosine_span_stats:supports": _on_cuda,
    "taylor_stats": taylor_stats,
    "taylor_stats:supports": _on_cuda,
    "lm_head_nll_fwd": lm_head_nll_fwd,
    "lm_head_nll_fwd:supports": _on_cuda,
    "gram_stats": gram_stats,
    "gram_stats:supports": _on_cuda,
}
