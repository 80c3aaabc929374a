"""Chunked logit-distillation op `lm_head_kd`: forward and gradients against the float64 full-logit oracle
`lm_head_kd_ref` and against torch's own kl_div; odd shapes, every dtype, softcap/scale/bias, padding rows."""
from __future__ import annotations

import pytest
import torch
from ops_helpers import poisoned_empty

from shortllm.ops.cross_entropy import lm_head_kd, lm_head_kd_ref

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
FWD_TOL = {F32: 2e-4, BF16: 0.15, F64: 1e-10}  # absolute, per row
GRAD_TOL = {F32: 1e-4, BF16: 8e-2, F64: 1e-10}  # relative to the largest gradient element


def make(n, v, d, dt, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * 2).to(dtype)
    ht = torch.randn(n, dt, generator=g).to(dtype)
    wt = (torch.randn(v, dt, generator=g) / dt ** 0.5 * 3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    bt = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    valid = torch.rand(n, generator=g) > 0.2
    return h, w, ht, wt, b, bt, valid


@pytest.mark.parametrize("n", [1, 129, 577])
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("variant", ["plain", "softcap_scale_bias"])
def test_forward_and_grad_match_ref(n, dtype, variant):
    v, d, dt = 97, 24, 40  # teacher wider than the student (a pruned model's source)
    h, w, ht, wt, b, bt, valid = make(n, v, d, dt, dtype, seed=n, bias=variant != "plain")
    opts = dict(temperature=2.0) if variant == "plain" else dict(
        temperature=1.5, softcap=5.0, scale=0.7, softcap_teacher=8.0, scale_teacher=1.3)
    # padding rows may hold NaN/Inf: they must reach neither the result nor any gradient
    h[~valid] = float("nan")
    ht[~valid] = float("inf")
    h.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    with poisoned_empty():
        got = lm_head_kd(h, w, ht, wt, bias=b, bias_teacher=bt, valid=valid, chunk_rows=7, **opts)
    ref_in = [x.detach().to(F64).requires_grad_(True) for x in (h, w)] + \
             ([b.detach().to(F64).requires_grad_(True)] if b is not None else [])
    ref = lm_head_kd_ref(ref_in[0], ref_in[1], ht, wt, bias=ref_in[2] if b is not None else None, bias_teacher=bt,
                         valid=valid, **opts)
    assert got.dtype == (F64 if dtype == F64 else F32) and got.shape == (n,)
    assert torch.isfinite(got).all() and (got[~valid] == 0).all()
    assert (got.double() - ref.detach()).abs().max() <= FWD_TOL[dtype]
    gout = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    (got.double() * gout).sum().backward()
    (ref * gout).sum().backward()
    for mine, theirs in zip([h, w] + ([b] if b is not None else []), ref_in):
        g, r = mine.grad.double(), theirs.grad
        assert torch.isfinite(g).all() and mine.grad.dtype == mine.dtype
        assert (g - r).abs().max() <= GRAD_TOL[dtype] * r.abs().max() + 1e-12
    assert (h.grad[~valid] == 0).all()


def test_ref_equals_torch_kl_div_and_is_zero_for_the_same_model():
    h, w, ht, wt, _, _, _ = make(33, 50, 16, 16, F64, seed=3)
    for tau in (1.0, 3.0):
        ref = lm_head_kd_ref(h, w, ht, wt, temperature=tau)
        s, t = (h @ w.T) / tau, (ht @ wt.T) / tau
        kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                        reduction="none").sum(-1) * tau ** 2
        assert torch.allclose(ref, kl, rtol=1e-12, atol=1e-14)
    same = lm_head_kd(h, w, h, w, chunk_rows=5)
    assert same.abs().max() < 1e-12, "KL of a distribution with itself is 0"


def test_chunking_never_changes_the_result_and_bad_shapes_are_refused():
    h, w, ht, wt, _, _, valid = make(40, 64, 8, 12, F32, seed=9)
    full = lm_head_kd(h, w, ht, wt, valid=valid, chunk_rows=40)
    for rows in (1, 3, 16):
        assert torch.allclose(lm_head_kd(h, w, ht, wt, valid=valid, chunk_rows=rows), full, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="vocabularies differ"):
        lm_head_kd(h, w, ht, wt[:10])
    with pytest.raises(ValueError, match="h_teacher"):
        lm_head_kd(h, w, ht[:5], wt)
    with pytest.raises(ValueError, match="temperature"):
        lm_head_kd(h, w, ht, wt, temperature=0.0)
