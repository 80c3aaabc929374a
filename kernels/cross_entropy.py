"""Triton kernel for the LM-head cross-entropy forward: per row block, loop over vocabulary tiles,
compute the logits tile with tl.dot, apply scale and soft-cap, and keep an online max / sum-exp and
the target logit — the [N, V] logits never exist."""
from __future__ import annotations

import triton.language as tl


def lm_head_nll_kernel(h_ptr, w_ptr, b_ptr, t_ptr, nll_ptr, lse_ptr, N, V, D, sh, sw, scale, softcap, ignore_index,
                       HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    tz = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        c64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            a = tl.load(h_ptr + r64[:, None] * sh + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + c64[None, :] * sw + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        z = acc * scale
        if SOFTCAP:
            # softcap * tanh(z / softcap), tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly at +-1
            z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
        z = tl.where(cmask[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m[:, None]), axis=1)
        m = new_m
        tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    nll = tl.where(tgt != ignore_index, lse - tz, 0.0)
    tl.store(nll_ptr + rows, nll, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
