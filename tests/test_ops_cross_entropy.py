"""Chunked LM-head cross-entropy forward: every backend against the float64 oracle; outputs poisoned."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch
from ops_helpers import padding_mask, plant_nonfinite
from ops_helpers import poisoned_empty as _poisoned_empty

from shortllm.ops import lm_head_nll, lm_head_nll_ref

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# absolute error allowed per row on nll and lse. The fused backends widen bf16/fp16 operands to
# float32 before the matmul; the torch reference backend multiplies in the input dtype (bf16 logits).
# float64 inputs go to the torch path on every backend (float64 logits).
ABS_TOL = {
    "ref": {F32: 2e-4, BF16: 1e-1, F16: 2e-2, F64: 1e-9},
    "cpu": {F32: 2e-4, BF16: 2e-4, F16: 2e-4, F64: 1e-9},
    "triton": {F32: 2e-4, BF16: 2e-4, F16: 2e-4, F64: 1e-9},
}
# error allowed on a gradient, relative to its largest element. Backward is the chunked torch path on
# every backend: logits recomputed in the input dtype (bf16: 8-bit mantissa) against the forward's lse,
# and the gradients rounded to the input dtype.
GRAD_REL_TOL = {F32: 1e-5, BF16: 5e-2, F16: 5e-3, F64: 1e-12}


@pytest.fixture
def poisoned_empty():
    # any output element the kernels fail to write shows up as NaN
    with _poisoned_empty():
        yield


def make(n, v, d, dtype, seed, bias=False, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore and n > 2:
        t[1] = -100
    return h, w, b, t


def fwd(h, w, b, t, softcap, scale, chunk_rows):
    return torch.ops.shortllm.lm_head_nll_fwd(h, w, b, t, softcap, scale, -100, chunk_rows)


def check(backend, h, w, b, t, softcap=0.0, scale=1.0, chunk_rows=0):
    nll, lse = fwd(h, w, b, t, softcap, scale, chunk_rows)
    want = lm_head_nll_ref(h, w, t, b, softcap, scale)
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want_lse = torch.logsumexp(z, -1)
    tol = ABS_TOL[backend][h.dtype]
    assert nll.dtype == torch.float32 and nll.shape == (h.shape[0],)
    assert torch.isfinite(nll).all() and torch.isfinite(lse).all(), "an output element was not written"
    assert (nll.double() - want).abs().max().item() <= tol, (backend, (nll.double() - want).abs().max())
    assert (lse.double() - want_lse).abs().max().item() <= tol * (1 + want_lse.abs().max().item() / 10)
    assert (nll[t == -100] == 0).all(), "ignored rows must have nll 0"


CASES = [  # n, v, d, bias, softcap, scale, chunk_rows
    (1, 50, 1, False, 0.0, 1.0, 0),
    (3, 1000, 64, True, 0.0, 1.0, 2),
    (129, 1000, 577, False, 30.0, 1.0, 0),
    (129, 8200, 64, True, 0.0, 0.5, 50),   # crosses the CPU backend's vocabulary chunk
    (37, 300, 577, True, 5.0, 2.0, 7),     # soft-cap active (logits up to ~|5|)
]


@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,v,d,bias,softcap,scale,chunk", CASES, ids=lambda x: str(x))
def test_matches_ref(backend, poisoned_empty, n, v, d, bias, softcap, scale, chunk, dtype):
    if backend == "triton" and v > 2000:
        v = 1500  # interpreter: bound the number of tiles
    h, w, b, t = make(n, v, d, dtype, seed=n + v + d, bias=bias)
    check(backend, h, w, b, t, softcap, scale, chunk)


def test_all_rows_ignored(backend, poisoned_empty):
    h, w, b, t = make(5, 100, 16, F32, seed=1)
    t[:] = -100
    nll, lse = fwd(h, w, b, t, 0.0, 1.0, 0)
    assert (nll == 0).all() and torch.isfinite(lse).all()


def test_gradients_through_fused_forward(backend):
    # backward is the chunked torch recomputation; it consumes the fused forward's lse
    h, w, b, t = make(17, 200, 32, F32, seed=3, bias=True)
    h.requires_grad_(True)
    w.requires_grad_(True)
    nll = lm_head_nll(h, w, t, bias=b, softcap=10.0, chunk_rows=5)
    nll.sum().backward()
    hd, wd = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    lm_head_nll_ref(hd, wd, t, b.double(), 10.0).sum().backward()
    assert torch.allclose(h.grad.double(), hd.grad, atol=1e-5), (h.grad.double() - hd.grad).abs().max()
    assert torch.allclose(w.grad.double(), wd.grad, atol=1e-5), (w.grad.double() - wd.grad).abs().max()


# Ignored rows (target == ignore_index: padding) never reach a result, whatever their hidden states hold:
# NaN/Inf planted there must leave the NLL of the valid rows, and every gradient, equal to the float64
# reference run on the valid rows alone (sliced out first), and finite.
PAD_CASES = [  # n, v, d, bias, softcap, chunk_rows
    (1, 97, 33, True, 0.0, 0),      # the only row is padding: all results are exact zeros
    (129, 301, 65, False, 0.0, 50),
    (129, 97, 129, True, 30.0, 7),  # soft-capped: tanh(NaN) must not leak through the (1 - t^2) factor
    (577, 301, 33, True, 0.0, 0),
]


# the Triton interpreter runs the planted NaN rows through numpy, which reports them
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", (F32, BF16, F16, F64), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,v,d,bias,softcap,chunk", PAD_CASES, ids=lambda x: str(x))
def test_nan_inf_in_ignored_rows_never_reach_nll_or_grads(backend, poisoned_empty, n, v, d, bias, softcap, chunk,
                                                           dtype):
    seed = n + 7 * v + 31 * d
    h, w, b, t = make(n, v, d, dtype, seed=seed, bias=bias, ignore=False)
    valid = padding_mask(n, seed)
    t[~valid] = -100
    plant_nonfinite([h], ~valid, seed)
    assert torch.isfinite(h[valid].double()).all(), "test setup"

    hv = h[valid].detach().double().requires_grad_(True)
    wd = w.detach().double().requires_grad_(True)
    bd = None if b is None else b.detach().double().requires_grad_(True)
    want = lm_head_nll_ref(hv, wd, t[valid], bd, softcap)
    want.sum().backward()

    h.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    nll = lm_head_nll(h, w, t, bias=b, softcap=softcap, chunk_rows=chunk)
    assert torch.isfinite(nll).all(), f"{backend}: a padded row's NaN/Inf reached the NLL"
    assert (nll[~valid] == 0).all(), "ignored rows must have nll exactly 0"
    err = (nll[valid].double() - want).abs().max().item() if valid.any() else 0.0
    assert err <= ABS_TOL[backend][dtype], f"{backend} {dtype}: nll |err|={err:.3g}"

    nll.sum().backward()
    assert torch.isfinite(h.grad).all(), f"{backend} {dtype}: grad h is not finite"
    assert (h.grad[~valid] == 0).all(), "ignored rows must get a zero gradient"
    grads = [("w", w.grad, wd.grad), ("h", h.grad[valid], hv.grad)] + ([] if b is None else [("b", b.grad, bd.grad)])
    for name, got, ref in grads:
        assert torch.isfinite(got).all(), f"{backend} {dtype}: NaN/Inf of ignored rows reached grad {name}"
        tol = GRAD_REL_TOL[dtype] * ref.abs().max().item() if ref.numel() else 0.0
        gerr = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
        assert gerr <= tol, f"{backend} {dtype}: grad {name} |err|={gerr:.3g} > {tol:.3g}"
