"""Row-wise cosine statistics of two [N, D] tensors: the reduction behind BI and angular distance.

Definition (the `_ref` below is the oracle and the documentation):
    cos_r   = clamp(x_r . y_r / (|x_r| |y_r|), -1, 1), and cos_r = 1 when |x_r| |y_r| == 0 (a zero vector);
              NaN/Inf in a row propagate into the sums (never silently replaced), so callers can detect them
    ang_r   = arccos(cos_r) / pi
    acc    += [sum_r m_r cos_r, sum_r m_r ang_r, sum_r m_r]      (m_r = mask, 1 when no mask)
`acc` is a float64 tensor of shape [3] on the inputs' device; accumulating in place means the
scorer never syncs with the host per call.
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
    m = torch.ones_like(cos) if mask is None else mask.reshape(-1).to(torch.float64)
    return torch.stack([(cos * m).sum(), (ang * m).sum(), m.sum()])


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
        mask = mask.reshape(-1).to(torch.bool).contiguous()
    _, impl = _backend.select("cosine_stats", x.device)
    impl(x, y, mask, acc)


@cosine_stats_.register_fake
def _(x: Tensor, y: Tensor, mask: Optional[Tensor], acc: Tensor) -> None:
    return None
