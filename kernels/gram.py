"""Triton kernel for the float64 Gram statistics (shortllm.ops.gram): one program per (i, j) tile of
output columns walks every row in order, BLOCK_R rows at a time, widens them to float64 and adds
x[:, i]^T x[:, j] and x[:, i]^T y[:, j] with tl.dot; masked rows (and rows/columns past the edge) are
replaced by zeros before the product, so NaN/Inf in padding never reach the sums. Each program adds its
tile into the accumulators once at the end (no atomics: deterministic)."""
from __future__ import annotations

import triton.language as tl


def gram_kernel(x_ptr, y_ptr, m_ptr, xtx_ptr, xty_ptr, N, D, sx, sy, HAS_MASK: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    ci = pi * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = pj * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = ci < D
    mj = cj < D
    a = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
    b = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        valid = rows < N
        if HAS_MASK:
            valid = valid & (tl.load(m_ptr + rows, mask=rows < N, other=0) != 0)
        r64 = rows.to(tl.int64)
        xi = tl.load(x_ptr + r64[:, None] * sx + ci[None, :], mask=valid[:, None] & mi[None, :], other=0.0)
        xj = tl.load(x_ptr + r64[:, None] * sx + cj[None, :], mask=valid[:, None] & mj[None, :], other=0.0)
        yj = tl.load(y_ptr + r64[:, None] * sy + cj[None, :], mask=valid[:, None] & mj[None, :], other=0.0)
        # select, never multiply by the mask: a masked load still sees NaN only if the mask let it through
        xi = tl.where(valid[:, None] & mi[None, :], xi.to(tl.float64), 0.0)
        xj = tl.where(valid[:, None] & mj[None, :], xj.to(tl.float64), 0.0)
        yj = tl.where(valid[:, None] & mj[None, :], yj.to(tl.float64), 0.0)
        xit = tl.trans(xi)
        a = tl.dot(xit, xj, a, input_precision="ieee")
        b = tl.dot(xit, yj, b, input_precision="ieee")
    out = ci.to(tl.int64)[:, None] * D + cj[None, :]
    omask = mi[:, None] & mj[None, :]
    tl.store(xtx_ptr + out, tl.load(xtx_ptr + out, mask=omask, other=0.0) + a, mask=omask)
    tl.store(xty_ptr + out, tl.load(xty_ptr + out, mask=omask, other=0.0) + b, mask=omask)
