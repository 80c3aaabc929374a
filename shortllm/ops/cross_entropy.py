"""Chunked LM-head cross-entropy: per-token NLL without materialising the [N, V] logits.

Definition (the `_ref` below is the oracle):
    z      = (h @ W^T + b) * scale
    logits = softcap * tanh(z / softcap)          (only when softcap > 0: Gemma-2/3)
    nll_n  = logsumexp(logits_n) - logits_n[t_n]   (0 where t_n == ignore_index)
An ignored row (padding) contributes nothing to the NLL or to any gradient, even when it holds NaN/Inf.
The op processes rows in chunks of `chunk_rows` (auto: about 64 MB of float32 logits per chunk),
keeps only the per-row log-sum-exp for backward and recomputes each chunk's logits there, so peak
memory is one chunk, not N x V. Differentiable w.r.t. `h` (and `W`/`b` when they require grad).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend

_CHUNK_ELEMS = 1 << 24  # float32 logits per chunk: 64 MB


def lm_head_nll_ref(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    softcap: float = 0.0,
    scale: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """float64 reference over full logits: per-row NLL [N] (0 for ignored rows)."""
    valid = targets != ignore_index
    # an ignored row (padding) never reaches a result, NaN/Inf included: it is selected away before the
    # matmul, because torch.where after it would still send 0 * NaN = NaN into the gradients of W and b
    hd = torch.where(valid[:, None], h.to(torch.float64), 0.0)
    z = hd @ weight.to(torch.float64).T
    if bias is not None:
        z = z + bias.to(torch.float64)
    z = z * scale
    if softcap and softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    nll = torch.logsumexp(z, -1) - z.gather(-1, safe_t[:, None])[:, 0]
    return torch.where(valid, nll, torch.zeros_like(nll))


def acc_dtype(h: Tensor) -> torch.dtype:
    """float32 logits/NLL for every input dtype except float64, which stays float64."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def chunk_rows_for(n: int, v: int, chunk_rows: int = 0) -> int:
    if chunk_rows and chunk_rows > 0:
        return max(1, min(n, chunk_rows))
    return max(1, min(n, _CHUNK_ELEMS // max(v, 1)))


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: float, scale: float):
    """float32 logits of a row chunk, plus the softcap's tanh (for backward) when used."""
    z = torch.nn.functional.linear(h, weight, bias)
    if z.dtype != torch.float64:  # float64 models keep float64 (test oracles); everything else float32
        z = z.float()
    if scale != 1.0:
        z = z * scale
    if softcap > 0:
        t = torch.tanh(z / softcap)
        return t * softcap, t
    return z, None


def _nll_fwd_torch(h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows):
    n, v = h.shape[0], weight.shape[0]
    rows = chunk_rows_for(n, v, chunk_rows)
    nll = torch.empty(n, dtype=acc_dtype(h), device=h.device)
    lse = torch.empty(n, dtype=acc_dtype(h), device=h.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        logits, _ = _chunk_logits(h[s:e], weight, bias, softcap, scale)
        t = targets[s:e]
        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t))
        chunk_lse = torch.logsumexp(logits, -1)
        tgt = logits.gather(-1, safe_t[:, None])[:, 0]
        lse[s:e] = chunk_lse
        nll[s:e] = torch.where(valid, chunk_lse - tgt, torch.zeros_like(tgt))
    return nll, lse


def _nll_bwd_torch(grad_nll, h, weight, bias, targets, lse, softcap, scale, ignore_index, chunk_rows,
                   need_h, need_w, need_b):
    n, v = h.shape[0], weight.shape[0]
    rows = chunk_rows_for(n, v, chunk_rows)
    gh = torch.empty_like(h) if need_h else None
    gw = torch.zeros(weight.shape, dtype=acc_dtype(weight), device=weight.device) if need_w else None
    gb = torch.zeros(v, dtype=acc_dtype(weight), device=weight.device) if need_b else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        logits, t = _chunk_logits(h[s:e], weight, bias, softcap, scale)
        tg = targets[s:e]
        valid = tg != ignore_index
        d = torch.exp(logits - lse[s:e, None])  # softmax
        d.scatter_add_(-1, torch.where(valid, tg, torch.zeros_like(tg))[:, None], -valid.to(d.dtype)[:, None])
        d.mul_(grad_nll[s:e].to(d.dtype)[:, None])
        if t is not None:
            d.mul_(1.0 - t * t)
        if scale != 1.0:
            d.mul_(scale)
        # ignored rows are dropped by selection, not by a zero gradient: their hidden states (padding) may be
        # NaN/Inf, and NaN * 0 = NaN would reach grad W / grad b through the matmuls below
        d.masked_fill_(~valid[:, None], 0.0)
        if need_h:
            gh[s:e] = (d.to(weight.dtype) @ weight).to(h.dtype)
        if need_w:
            hv = torch.where(valid[:, None], h[s:e].to(gw.dtype), 0.0)  # same reason: 0 * NaN in the matmul
            gw.addmm_(d.T.to(gw.dtype), hv)
        if need_b:
            gb.add_(d.sum(0))
    return gh, (None if gw is None else gw.to(weight.dtype)), (None if gb is None else gb.to(bias.dtype))


def _fwd_ref_backend(h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows):
    return _nll_fwd_torch(h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows)


_backend.register_ref("lm_head_nll_fwd", _fwd_ref_backend)


@torch.library.custom_op("shortllm::lm_head_nll_fwd", mutates_args=())
def _lm_head_nll_fwd(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    softcap: float, scale: float, ignore_index: int, chunk_rows: int,
) -> tuple[Tensor, Tensor]:
    _, impl = _backend.select("lm_head_nll_fwd", h.device)
    return impl(h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows)


@_lm_head_nll_fwd.register_fake
def _(h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows):
    n = h.shape[0]
    return h.new_empty(n, dtype=acc_dtype(h)), h.new_empty(n, dtype=acc_dtype(h))


@torch.library.custom_op("shortllm::lm_head_nll_bwd", mutates_args=())
def _lm_head_nll_bwd(
    grad_nll: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
    softcap: float, scale: float, ignore_index: int, chunk_rows: int, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    gh, gw, gb = _nll_bwd_torch(grad_nll, h, weight, bias, targets, lse, softcap, scale, ignore_index,
                                chunk_rows, True, need_w, need_b)
    # custom ops cannot return None: empty tensors stand for "no gradient"
    return gh, (gw if gw is not None else h.new_empty(0)), (gb if gb is not None else h.new_empty(0))


@_lm_head_nll_bwd.register_fake
def _(grad_nll, h, weight, bias, targets, lse, softcap, scale, ignore_index, chunk_rows, need_w, need_b):
    return (torch.empty_like(h), torch.empty_like(weight) if need_w else h.new_empty(0),
            (torch.empty_like(bias) if (need_b and bias is not None) else h.new_empty(0)))


def _setup_context(ctx, inputs, output):
    h, weight, bias, targets, softcap, scale, ignore_index, chunk_rows = inputs
    ctx.save_for_backward(h, weight, bias, targets, output[1])
    ctx.args = (softcap, scale, ignore_index, chunk_rows)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_nll, _grad_lse):
    h, weight, bias, targets, lse = ctx.saved_tensors
    softcap, scale, ignore_index, chunk_rows = ctx.args
    need_w = ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    gh, gw, gb = _lm_head_nll_bwd(grad_nll.contiguous(), h, weight, bias, targets, lse, softcap, scale,
                                  ignore_index, chunk_rows, need_w, need_b)
    return gh, (gw if need_w else None), (gb if need_b else None), None, None, None, None, None


_lm_head_nll_fwd.register_autograd(_backward, setup_context=_setup_context)


def lm_head_nll(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    softcap: float = 0.0,
    scale: float = 1.0,
    ignore_index: int = -100,
    chunk_rows: int = 0,
) -> Tensor:
    """Per-row NLL [N] (float32; float64 for float64 inputs; 0 for ignored rows) of `h` [N, D] through the LM
    head `weight` [V, D].

    Never materialises more than `chunk_rows` x V logits; differentiable.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"lm_head_nll: h must be [N, D] and weight [V, D]; "
                         f"got {tuple(h.shape)}, {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"lm_head_nll: targets must be [N]={h.shape[0]}; got {tuple(targets.shape)}")
    nll, _ = _lm_head_nll_fwd(h.contiguous(), weight, bias, targets.to(torch.long).contiguous(),
                              float(softcap or 0.0), float(scale), int(ignore_index), int(chunk_rows))
    return nll


# ---------------------------------------------------------------- chunked logit distillation
# Definition (`lm_head_kd_ref` is the oracle): with student logits s = head_s(h) and teacher logits
# t = head_t(h_t) (weight, bias, scale, softcap as above), at temperature tau,
#     kd_n = tau^2 * KL(softmax(t_n / tau) || softmax(s_n / tau))
#          = tau^2 * sum_v p_v * (log p_v - log q_v),   p = softmax(t/tau), q = softmax(s/tau)
# (0 for rows with valid == False). tau^2 keeps the gradient's size independent of tau (Hinton et al.).
# Only the student side is differentiable: the teacher is a constant (it runs under no_grad).
# Gradient w.r.t. the student logits: d kd_n / d s_n = tau * (q_n - p_n).


def lm_head_kd_ref(
    h: Tensor, weight: Tensor, h_teacher: Tensor, weight_teacher: Tensor,
    bias: Optional[Tensor] = None, bias_teacher: Optional[Tensor] = None,
    temperature: float = 1.0, softcap: float = 0.0, scale: float = 1.0,
    softcap_teacher: float = 0.0, scale_teacher: float = 1.0, valid: Optional[Tensor] = None,
) -> Tensor:
    """float64 reference over full logits: per-row tau^2 * KL(teacher || student) [N] (0 for invalid rows)."""
    def logits(x, w, b, cap, sc):
        z = x.to(torch.float64) @ w.to(torch.float64).T
        if b is not None:
            z = z + b.to(torch.float64)
        z = z * sc
        return cap * torch.tanh(z / cap) if cap and cap > 0 else z

    keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if valid is None else valid
    hs = torch.where(keep[:, None], h.to(torch.float64), 0.0)  # invalid rows never reach a result, NaN included
    ht = torch.where(keep[:, None], h_teacher.to(torch.float64), 0.0)
    log_q = torch.log_softmax(logits(hs, weight, bias, softcap, scale) / temperature, -1)
    log_p = torch.log_softmax(logits(ht, weight_teacher, bias_teacher, softcap_teacher, scale_teacher)
                              / temperature, -1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    return torch.where(keep, kd, torch.zeros_like(kd))


def _kd_chunk(h, weight, bias, ht, wt, bt, tau, softcap, scale, softcap_t, scale_t):
    """Student logits/tau (with the softcap's tanh for backward) and teacher log-probabilities of a row chunk."""
    s, tanh_s = _chunk_logits(h, weight, bias, softcap, scale)
    t, _ = _chunk_logits(ht, wt, bt, softcap_t, scale_t)
    log_p = torch.log_softmax(t.to(s.dtype) / tau, -1)  # in the student's accumulation dtype
    return s / tau, tanh_s, log_p


def _kd_fwd_torch(h, weight, bias, ht, wt, bt, valid, tau, softcap, scale, softcap_t, scale_t, chunk_rows):
    n, v = h.shape[0], weight.shape[0]
    rows = chunk_rows_for(n, v, chunk_rows)
    kd = torch.empty(n, dtype=acc_dtype(h), device=h.device)
    lse = torch.empty(n, dtype=acc_dtype(h), device=h.device)
    for s0 in range(0, n, rows):
        e = min(n, s0 + rows)
        s, _, log_p = _kd_chunk(h[s0:e], weight, bias, ht[s0:e], wt, bt, tau, softcap, scale, softcap_t, scale_t)
        chunk_lse = torch.logsumexp(s, -1)
        # sum_v p (log p - log q) with log q = s - lse(s)
        row = (log_p.exp() * (log_p - s)).sum(-1) + chunk_lse
        lse[s0:e] = chunk_lse
        ok = valid[s0:e]
        kd[s0:e] = torch.where(ok, row * (tau * tau), torch.zeros_like(row))
    return kd, lse


def _kd_bwd_torch(grad_kd, h, weight, bias, ht, wt, bt, valid, lse, tau, softcap, scale, softcap_t, scale_t,
                  chunk_rows, need_w, need_b):
    n, v = h.shape[0], weight.shape[0]
    rows = chunk_rows_for(n, v, chunk_rows)
    gh = torch.empty_like(h)
    gw = torch.zeros(weight.shape, dtype=acc_dtype(weight), device=weight.device) if need_w else None
    gb = torch.zeros(v, dtype=acc_dtype(weight), device=weight.device) if need_b else None
    for s0 in range(0, n, rows):
        e = min(n, s0 + rows)
        s, tanh_s, log_p = _kd_chunk(h[s0:e], weight, bias, ht[s0:e], wt, bt, tau, softcap, scale,
                                     softcap_t, scale_t)
        ok = valid[s0:e]
        # d kd / d z (pre-temperature student logits) = tau * (q - p); then through softcap and scale
        d = torch.exp(s - lse[s0:e, None]).sub_(log_p.exp()).mul_(tau)
        d.mul_(grad_kd[s0:e].to(d.dtype)[:, None])
        if tanh_s is not None:
            d.mul_(1.0 - tanh_s * tanh_s)
        if scale != 1.0:
            d.mul_(scale)
        d.masked_fill_(~ok[:, None], 0.0)  # invalid rows (padding, possibly NaN) are selected away, as in the NLL op
        gh[s0:e] = (d.to(weight.dtype) @ weight).to(h.dtype)
        if need_w:
            gw.addmm_(d.T.to(gw.dtype), torch.where(ok[:, None], h[s0:e].to(gw.dtype), 0.0))
        if need_b:
            gb.add_(d.sum(0))
    return gh, (None if gw is None else gw.to(weight.dtype)), (None if gb is None else gb.to(bias.dtype))


@torch.library.custom_op("shortllm::lm_head_kd_fwd", mutates_args=())
def _lm_head_kd_fwd(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], h_teacher: Tensor, weight_teacher: Tensor,
    bias_teacher: Optional[Tensor], valid: Tensor, temperature: float, softcap: float, scale: float,
    softcap_teacher: float, scale_teacher: float, chunk_rows: int,
) -> tuple[Tensor, Tensor]:
    return _kd_fwd_torch(h, weight, bias, h_teacher, weight_teacher, bias_teacher, valid, temperature, softcap,
                         scale, softcap_teacher, scale_teacher, chunk_rows)


@_lm_head_kd_fwd.register_fake
def _(h, weight, bias, h_teacher, weight_teacher, bias_teacher, valid, temperature, softcap, scale,
      softcap_teacher, scale_teacher, chunk_rows):
    n = h.shape[0]
    return h.new_empty(n, dtype=acc_dtype(h)), h.new_empty(n, dtype=acc_dtype(h))


@torch.library.custom_op("shortllm::lm_head_kd_bwd", mutates_args=())
def _lm_head_kd_bwd(
    grad_kd: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], h_teacher: Tensor, weight_teacher: Tensor,
    bias_teacher: Optional[Tensor], valid: Tensor, lse: Tensor, temperature: float, softcap: float, scale: float,
    softcap_teacher: float, scale_teacher: float, chunk_rows: int, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    gh, gw, gb = _kd_bwd_torch(grad_kd, h, weight, bias, h_teacher, weight_teacher, bias_teacher, valid, lse,
                               temperature, softcap, scale, softcap_teacher, scale_teacher, chunk_rows, need_w, need_b)
    return gh, (gw if gw is not None else h.new_empty(0)), (gb if gb is not None else h.new_empty(0))


@_lm_head_kd_bwd.register_fake
def _(grad_kd, h, weight, bias, h_teacher, weight_teacher, bias_teacher, valid, lse, temperature, softcap, scale,
      softcap_teacher, scale_teacher, chunk_rows, need_w, need_b):
    return (torch.empty_like(h), torch.empty_like(weight) if need_w else h.new_empty(0),
            (torch.empty_like(bias) if (need_b and bias is not None) else h.new_empty(0)))


def _kd_setup_context(ctx, inputs, output):
    h, weight, bias, ht, wt, bt, valid, *scalars = inputs
    # only the per-row log-sum-exp is kept; backward recomputes each chunk's logits of both heads
    ctx.save_for_backward(h, weight, bias, ht, wt, bt, valid, output[1])
    ctx.scalars = scalars
    ctx.has_bias = bias is not None


def _kd_backward(ctx, grad_kd, _grad_lse):
    h, weight, bias, ht, wt, bt, valid, lse = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    gh, gw, gb = _lm_head_kd_bwd(grad_kd.contiguous(), h, weight, bias, ht, wt, bt, valid, lse, *ctx.scalars,
                                 need_w, need_b)
    return (gh, (gw if need_w else None), (gb if need_b else None)) + (None,) * 10


_lm_head_kd_fwd.register_autograd(_kd_backward, setup_context=_kd_setup_context)


def lm_head_kd(
    h: Tensor, weight: Tensor, h_teacher: Tensor, weight_teacher: Tensor,
    bias: Optional[Tensor] = None, bias_teacher: Optional[Tensor] = None,
    temperature: float = 1.0, softcap: float = 0.0, scale: float = 1.0,
    softcap_teacher: float = 0.0, scale_teacher: float = 1.0, valid: Optional[Tensor] = None,
    chunk_rows: int = 0,
) -> Tensor:
    """Per-row tau^2 * KL(softmax(t/tau) || softmax(s/tau)) [N] (float32; float64 for float64 inputs; 0 where
    ``valid`` is False) of student hidden states `h` [N, D] through `weight` [V, D] against the teacher's
    `h_teacher` [N, D_t] through `weight_teacher` [V, D_t].

    Never materialises more than `chunk_rows` x V logits of either model, in forward or backward;
    differentiable w.r.t. the student's `h`, `weight` and `bias` (the teacher's inputs are constants).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"lm_head_kd: h must be [N, D] and weight [V, D]; got {tuple(h.shape)}, {tuple(weight.shape)}")
    if h_teacher.dim() != 2 or h_teacher.shape[0] != h.shape[0] or h_teacher.shape[1] != weight_teacher.shape[1]:
        raise ValueError(f"lm_head_kd: h_teacher must be [N={h.shape[0]}, D_t] matching weight_teacher [V, D_t]; "
                         f"got {tuple(h_teacher.shape)}, {tuple(weight_teacher.shape)}")
    if weight_teacher.shape[0] != weight.shape[0]:
        raise ValueError(f"lm_head_kd: student and teacher vocabularies differ ({weight.shape[0]} vs "
                         f"{weight_teacher.shape[0]}); distillation needs the same tokenizer")
    if not temperature > 0:
        raise ValueError(f"lm_head_kd: temperature must be > 0; got {temperature}")
    keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if valid is None else valid.to(torch.bool)
    if keep.shape != (h.shape[0],):
        raise ValueError(f"lm_head_kd: valid must be [N]={h.shape[0]}; got {tuple(keep.shape)}")
    kd, _ = _lm_head_kd_fwd(h.contiguous(), weight, bias, h_teacher.detach().contiguous(), weight_teacher.detach(),
                            None if bias_teacher is None else bias_teacher.detach(), keep.contiguous(),
                            float(temperature), float(softcap or 0.0), float(scale), float(softcap_teacher or 0.0),
                            float(scale_teacher), int(chunk_rows))
    return kd
