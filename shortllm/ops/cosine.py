"""Row-wise cosine statistics of two [N, D] tensors: the reduction behind BI and angular distance.

Definition (the `_ref` below is the oracle and the documentation):
    cos_r   = clamp(x_r . y_r / (|x_r| |y_r|), -1, 1), and cos_r = 1 when |x_r| |y_r| == 0 (a zero vector);
              NaN/Inf in a valid row propagate into the sums (never silently replaced), so callers detect them
    ang_r   = arccos(cos_r) / pi
    acc    += [sum_{r: m_r} cos_r, sum_{r: m_r} ang_r, #{r: m_r}]   (m_r = mask[r] != 0, true when no mask)
A masked (padded) row never reaches a statistic on any backend, whatever it holds: NaN/Inf there is
ignored (rows are selected or skipped, never multiplied by the mask, since NaN * 0 = NaN).
`acc` is a float64 tensor of shape [3], normally on the inputs' device (in place: the scorer never
syncs with the host per call); an `acc` on another device works too, at the cost of a copy.

`cosine_span_stats_(xs, y, mask, acc)` is the same statistic for k inputs against one y (every span of
the angular metric that ends at one block output): row i of the float64 [k, 3] `acc` gets exactly what
`cosine_stats_(xs[i], y, mask, acc[i])` would add. The CPU kernel reads y and sums |y|^2 once per row
instead of k times (bit-identical to k single calls); `cosine_span_stats_ref` loops the single reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend


def cosine_stats_ref(x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """float64 reference: returns [sum cos, sum angular, count] over valid rows."""
    xd, yd = x.to(torch.float64), y.to(torch.float64)
    dot = (xd * yd).sum(-1)
    nx, ny = xd.square().sum(-1).sqrt(), yd.square().sum(-1).sqrt()
    denom = nx * ny
    # exactly-zero norm product -> 1 by definition; NaN/Inf must propagate (the scorer detects them)
    cos = torch.where(denom == 0, torch.ones_like(dot), dot / torch.where(denom == 0, 1.0, denom))
    cos = cos.clamp(-1.0, 1.0)
    ang = torch.arccos(cos) / math.pi
    if mask is None:
        return torch.stack([cos.sum(), ang.sum(), torch.ones_like(cos).sum()])
    m = mask.reshape(-1).to(device=cos.device, dtype=torch.bool)
    # select, never multiply by the mask: a padded row may hold NaN/Inf, and NaN * 0 = NaN
    zero = cos.new_zeros(())
    return torch.stack([torch.where(m, cos, zero).sum(), torch.where(m, ang, zero).sum(), m.sum().to(cos.dtype)])


def _cosine_stats_ref_inplace(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    acc.add_(cosine_stats_ref(x, y, mask).to(acc.device))


_backend.register_ref("cosine_stats", _cosine_stats_ref_inplace)


def _check(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"cosine_stats_: x and y must both be [N, D]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if mask is not None and mask.numel() != x.shape[0]:
        raise ValueError(f"cosine_stats_: mask has {mask.numel()} entries for {x.shape[0]} rows")
    if acc.dtype != torch.float64 or acc.numel() != 3:
        raise ValueError("cosine_stats_: acc must be a float64 tensor of 3 elements")


@torch.library.custom_op("shortllm::cosine_stats_", mutates_args=("acc",))
def cosine_stats_(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    """acc += [sum cos, sum angular, count] of the rows of x and y where mask is true."""
    _check(x, y, mask, acc)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    if mask is not None:
        # the kernels read the mask through a raw pointer next to x's: it must live on x's device
        mask = mask.reshape(-1).to(device=x.device, dtype=torch.bool).contiguous()
    _, impl = _backend.select("cosine_stats", x.device)
    impl(x, y, mask, acc)


@cosine_stats_.register_fake
def _(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    return None



def cosine_span_stats_ref(xs: list[Tensor], y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """float64 reference: [k, 3], row i = cosine_stats_ref(xs[i], y, mask) (the definition, pair by pair)."""
    if not xs:
        return torch.zeros(0, 3, dtype=torch.float64, device=y.device)
    return torch.stack([cosine_stats_ref(x, y, mask) for x in xs])


def _cosine_span_stats_ref_inplace(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    if xs:
        acc.add_(cosine_span_stats_ref(xs, y, mask).to(acc.device))


_backend.register_ref("cosine_span_stats", _cosine_span_stats_ref_inplace)


def _check_span(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    if y.dim() != 2:
        raise ValueError(f"cosine_span_stats_: y must be [N, D]; got {tuple(y.shape)}")
    for i, x in enumerate(xs):
        if x.shape != y.shape or x.device != y.device:
            raise ValueError(f"cosine_span_stats_: xs[{i}] is {tuple(x.shape)} on {x.device}; every x must match "
                             f"y ({tuple(y.shape)} on {y.device})")
    if mask is not None and mask.numel() != y.shape[0]:
        raise ValueError(f"cosine_span_stats_: mask has {mask.numel()} entries for {y.shape[0]} rows")
    if acc.dtype != torch.float64 or tuple(acc.shape) != (len(xs), 3):
        raise ValueError(f"cosine_span_stats_: acc must be a float64 tensor of shape [{len(xs)}, 3] (one row per x); "
                         f"got {acc.dtype} {tuple(acc.shape)}")


@torch.library.custom_op("shortllm::cosine_span_stats_", mutates_args=("acc",))
def cosine_span_stats_(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    """acc[i] += [sum cos, sum angular, count] of the rows of xs[i] and y where mask is true, for every i.

    One pass over y for all the xs (the spans that end at one block output). `acc` may be a strided view
    (the scorer passes one diagonal of its [n_max, L, 3] accumulator)."""
    _check_span(xs, y, mask, acc)
    if not xs:
        return
    if y.stride(-1) != 1:
        y = y.contiguous()
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    if mask is not None:
        # the kernels read the mask through a raw pointer next to y's: it must live on y's device
        mask = mask.reshape(-1).to(device=y.device, dtype=torch.bool).contiguous()
    _, impl = _backend.select("cosine_span_stats", y.device)
    impl(xs, y, mask, acc)


@cosine_span_stats_.register_fake
def _(xs: list[Tensor], y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    return None
