"""Triton backend: kernels in `shortllm.kernels` (kernels/ in the source tree).

Runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (how the tests check the
kernels without a GPU). Per-program partial sums go to a small float64 buffer summed by torch:
deterministic and free of host syncs. Every launch runs on its input's device (`device_guard`), not on
whichever device is current.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton  # noqa: F401 - ImportError here means "backend unavailable"
from torch import Tensor

from ..kernels import _jit
from ..kernels import cross_entropy as _ce
from ..kernels import gram as _gram
from ..kernels import reductions as _red
from . import _backend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interp() -> bool:
    # triton fixes interpreter vs compiler for its own library functions when it is imported, so
    # the variable must have been set before then, not just now
    import triton.language as tl

    return os.environ.get("TRITON_INTERPRET") == "1" and type(tl.sum).__name__ == "InterpretedFunction"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _ok(*ts: Optional[Tensor]) -> bool:
    return all(t is None or t.dtype in _DTYPES for t in ts)


def cosine_stats(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    if not _ok(x, y) or x.dtype != y.dtype:
        return _backend._REF["cosine_stats"](x, y, mask, acc)
    x, y = _backend.kernel_rows(x, y)
    n, d = x.shape
    if n == 0:
        return
    if x.device.type == "cpu":  # interpreter: few programs, big tiles (~5 ms per program)
        block_d = _pow2(d, 16, 4096)
        block_n = _pow2(n, 16, max(16, (1 << 18) // block_d))
    else:
        block_d = _pow2(d, 16, 1024)
        block_n = 4
    grid = triton.cdiv(n, block_n)
    part = torch.empty(grid * 3, dtype=torch.float64, device=x.device)
    m = mask.reshape(-1).to(device=x.device, dtype=torch.bool).contiguous().view(torch.uint8) if mask is not None \
        else part
    with _backend.device_guard(x.device):
        _jit.jit(_red.cosine_kernel)[(grid,)](x, y, m, part, n, d, x.stride(0), y.stride(0),
                                              HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_D=block_d)
    acc.add_(part.view(grid, 3).sum(0).to(acc.device))


def cosine_span_stats(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    # Not fused: one cosine_kernel launch per x (y is re-read k times). Correct and deterministic, same
    # sums as k cosine_stats calls; a fused kernel would take a pointer table (not needed on CPU scoring).
    for i, x in enumerate(xs):
        cosine_stats(x, y, mask, acc[i])


def taylor_stats(w: Tensor, g: Optional[Tensor], acc: Tensor) -> None:
    if not _ok(w, g):
        return _backend._REF["taylor_stats"](w, g, acc)
    if g is not None and g.dtype != w.dtype:
        w, g = w.float(), g.float()
    w = w.detach().contiguous()
    g = None if g is None else g.detach().contiguous()
    n = w.numel()
    if n == 0:
        return
    if w.device.type == "cpu":
        block, iters = _pow2(n, 16, 1 << 16), 4
    else:
        block, iters = 1024, 16
    grid = triton.cdiv(n, block * iters)
    part = torch.empty(grid * 3, dtype=torch.float64, device=w.device)
    with _backend.device_guard(w.device):
        _jit.jit(_red.taylor_kernel)[(grid,)](w, g if g is not None else w, part, n, HAS_G=g is not None,
                                              BLOCK=block, ITERS=iters)
    acc.add_(part.view(grid, 3).sum(0).to(acc.device))


def lm_head_nll_fwd(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, softcap: float,
                    scale: float, ignore_index: int, chunk_rows: int) -> tuple[Tensor, Tensor]:
    if not _ok(h, weight, bias):
        return _backend._REF["lm_head_nll_fwd"](h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows)
    h = h.contiguous()
    weight = weight.contiguous()
    n, d = h.shape
    v = weight.shape[0]
    nll = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return nll, lse
    interp = h.device.type == "cpu"
    if interp:
        bm, bv, bk = _pow2(n, 16, 128), _pow2(v, 16, 1024), _pow2(d, 16, 256)
    else:
        bm, bv, bk = 64, 128, 64
    grid = triton.cdiv(n, bm)
    with _backend.device_guard(h.device):
        _jit.jit(_ce.lm_head_nll_kernel)[(grid,)](
            h, weight, bias if bias is not None else weight, targets.to(torch.long).contiguous(), nll, lse, n, v, d,
            h.stride(0), weight.stride(0), float(scale), float(softcap or 1.0), int(ignore_index),
            HAS_BIAS=bias is not None, SOFTCAP=bool(softcap and softcap > 0),
            DOT_F32=interp or h.dtype == torch.float32 or h.dtype != weight.dtype,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
    return nll, lse


def gram_stats(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    if not _ok(x, y) or x.dtype != y.dtype:
        return _backend._REF["gram_stats"](x, y, mask, xtx, xty)
    x, y = _backend.kernel_rows(x, y)
    n, d = x.shape
    if n == 0 or d == 0:
        return
    # the kernel adds into its accumulators: scratch on the inputs' device when they live elsewhere
    a = xtx if xtx.device == x.device else torch.zeros_like(xtx, device=x.device)
    b = xty if xty.device == x.device else torch.zeros_like(xty, device=x.device)
    if x.device.type == "cpu":  # interpreter: few programs, big tiles
        block_d, block_r = _pow2(d, 16, 128), _pow2(n, 16, 256)
    else:
        block_d, block_r = 32, 32
    grid = (triton.cdiv(d, block_d), triton.cdiv(d, block_d))
    m = mask.reshape(-1).to(device=x.device, dtype=torch.bool).contiguous().view(torch.uint8) if mask is not None \
        else a
    with _backend.device_guard(x.device):
        _jit.jit(_gram.gram_kernel)[grid](x, y, m, a, b, n, d, x.stride(0), y.stride(0), HAS_MASK=mask is not None,
                                          BLOCK_R=block_r, BLOCK_D=block_d)
    if a is not xtx:
        xtx.add_(a.to(xtx.device))
    if b is not xty:
        xty.add_(b.to(xty.device))


def _supports(device: torch.device) -> bool:
    t = torch.device(device).type
    return t == "cuda" or (t == "cpu" and _interp())


IMPLS: dict[str, Callable] = {
    "cosine_stats": cosine_stats,
    "cosine_stats:supports": _supports,
    "cosine_span_stats": cosine_span_stats,
    "cosine_span_stats:supports": _supports,
    "taylor_stats": taylor_stats,
    "taylor_stats:supports": _supports,
    "lm_head_nll_fwd": lm_head_nll_fwd,
    "lm_head_nll_fwd:supports": _supports,
    "gram_stats": gram_stats,
    "gram_stats:supports": _supports,
}
