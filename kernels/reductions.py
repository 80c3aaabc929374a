"""Triton kernels for the row-cosine statistics and the Taylor/magnitude reduction.

Each program writes its float64 partial sums to its own slot of a small buffer; the caller sums the
slots with torch (fixed order, deterministic, no atomics, no host sync).
Row reductions are float32 (x.y, |x|^2, |y|^2): rows whose squared norm exceeds float32's range
(|v| > ~1e19, bf16 only) are out of scope here; the C++ kernels handle them in double.
"""
from __future__ import annotations

import triton.language as tl


def cosine_kernel(x_ptr, y_ptr, m_ptr, part_ptr, N, D, sx, sy,
                  HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = rows < N
    if HAS_MASK:
        valid = valid & (tl.load(m_ptr + rows, mask=valid, other=0) != 0)
    r64 = rows.to(tl.int64)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    xx = tl.zeros([BLOCK_N], dtype=tl.float32)
    yy = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = valid[:, None] & (cols[None, :] < D)  # padded rows are never read (as the C++/CUDA kernels)
        xv = tl.load(x_ptr + r64[:, None] * sx + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + r64[:, None] * sy + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dot += tl.sum(xv * yv, axis=1)
        xx += tl.sum(xv * xv, axis=1)
        yy += tl.sum(yv * yv, axis=1)
    denom = tl.sqrt(xx) * tl.sqrt(yy)
    c = tl.where(denom == 0, 1.0, dot / tl.where(denom == 0, 1.0, denom))  # NaN propagates
    c = tl.minimum(tl.maximum(c, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    # arccos(a) = sqrt(1 - a) * P(a) on [0, 1], |error| < 2.2e-8 (Abramowitz & Stegun 4.4.46);
    # triton has no arccos, and this keeps full relative accuracy near cos = 1
    a = tl.abs(c)
    p = -0.0012624911
    p = p * a + 0.0066700901
    p = p * a - 0.0170881256
    p = p * a + 0.0308918810
    p = p * a - 0.0501743046
    p = p * a + 0.0889789874
    p = p * a - 0.2145988016
    p = p * a + 1.5707963050
    acos_a = tl.sqrt(1.0 - a) * p
    ang = tl.where(c < 0, 3.141592653589793 - acos_a, acos_a) * 0.3183098861837907
    # select, never weight by the mask: a padded row reads as a zero vector (cos 1), and a weight of 0
    # would not remove NaN/Inf anyway (NaN * 0 = NaN)
    tl.store(part_ptr + pid * 3 + 0, tl.sum(tl.where(valid, c.to(tl.float64), 0.0), axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(tl.where(valid, ang.to(tl.float64), 0.0), axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(valid.to(tl.float64), axis=0))


def taylor_kernel(w_ptr, g_ptr, part_ptr, n, HAS_G: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    s = tl.zeros([BLOCK], dtype=tl.float64)
    sa = tl.zeros([BLOCK], dtype=tl.float64)
    mag = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        msk = offs < n
        w = tl.load(w_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        mag += tl.abs(w).to(tl.float64)
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
            p = w * g  # float32 product of widened operands (never in half precision)
            s += p.to(tl.float64)
            sa += tl.abs(p).to(tl.float64)
    tl.store(part_ptr + pid * 3 + 0, tl.sum(s, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(sa, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(mag, axis=0))
