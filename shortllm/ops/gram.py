"""Streaming float64 Gram statistics of two [N, D] tensors: what seam healing needs to fit a linear map.

Definition (the `_ref` below is the oracle and the documentation):
    xtx += sum_{r: m_r} x_r^T x_r      ([D, D], float64)
    xty += sum_{r: m_r} x_r^T y_r      ([D, D], float64)
with x_r, y_r the rows widened to float64 before any product (a product of two fp32/bf16/fp16 values is
exact in float64, so every backend differs from the reference only in summation order), and
m_r = mask[r] != 0 (every row when there is no mask). A masked (padded) row is skipped, never multiplied
by the mask, so NaN/Inf in it never reach the sums; NaN/Inf in a valid row propagate.
`xtx` and `xty` are contiguous float64 [D, D] tensors, accumulated in place (the healing pass adds one
batch after another without a host sync); they may hold earlier sums, which are kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend


def gram_ref(x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """float64 reference: returns (x^T x, x^T y) over the valid rows."""
    xd, yd = x.to(torch.float64), y.to(torch.float64)
    if mask is not None:
        keep = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        xd, yd = xd[keep], yd[keep]  # select, never weight: a padded row may hold NaN/Inf
    return xd.T @ xd, xd.T @ yd


def _gram_ref_inplace(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    a, b = gram_ref(x, y, mask)
    xtx.add_(a.to(xtx.device))
    xty.add_(b.to(xty.device))


_backend.register_ref("gram_stats", _gram_ref_inplace)


def _check(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"gram_: x and y must both be [N, D]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"gram_: x is on {x.device} but y on {y.device}; put both on one device")
    if mask is not None and mask.numel() != x.shape[0]:
        raise ValueError(f"gram_: mask has {mask.numel()} entries for {x.shape[0]} rows")
    d = x.shape[1]
    for name, acc in (("xtx", xtx), ("xty", xty)):
        if acc.dtype != torch.float64 or tuple(acc.shape) != (d, d) or not acc.is_contiguous():
            raise ValueError(f"gram_: {name} must be a contiguous float64 tensor of shape [{d}, {d}]; got "
                             f"{acc.dtype} {tuple(acc.shape)}")


@torch.library.custom_op("shortllm::gram_", mutates_args=("xtx", "xty"))
def gram_(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    """xtx += x^T x and xty += x^T y over the rows of x and y where mask is true (float64 sums)."""
    _check(x, y, mask, xtx, xty)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    if mask is not None:
        # the kernels read the mask through a raw pointer next to x's: it must live on x's device
        mask = mask.reshape(-1).to(device=x.device, dtype=torch.bool).contiguous()
    _, impl = _backend.select("gram_stats", x.device)
    impl(x, y, mask, xtx, xty)


@gram_.register_fake
def _(x: Tensor, y: Tensor, mask: Optional[Tensor], xtx: Tensor, xty: Tensor) -> None:
    return None
