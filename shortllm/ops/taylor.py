"""Taylor / magnitude reduction of one weight tensor and its gradient.

Definition (the `_ref` below is the oracle):
    acc += [sum W*G, sum |W*G|, sum |W|]
products formed in float32 or better (never fp16: W*G underflows), accumulated in float64.
With `g=None` only the magnitude term is added (Mag needs no data).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend


def taylor_stats_ref(w: Tensor, g: Optional[Tensor] = None) -> Tensor:
    """float64 reference: returns [sum W*G, sum |W*G|, sum |W|] (first two 0 when g is None)."""
    wd = w.detach().to(torch.float64)
    mag = wd.abs().sum()
    if g is None:
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        return torch.stack([zero, zero, mag])
    prod = wd * g.detach().to(torch.float64)
    return torch.stack([prod.sum(), prod.abs().sum(), mag])


def _taylor_stats_ref_inplace(w: Tensor, g: Optional[Tensor], acc: Tensor) -> None:
    acc.add_(taylor_stats_ref(w, g).to(acc.device))


_backend.register_ref("taylor_stats", _taylor_stats_ref_inplace)


@torch.library.custom_op("shortllm::taylor_stats_", mutates_args=("acc",))
def taylor_stats_(w: Tensor, g: Optional[Tensor], acc: Tensor) -> None:
    """acc += [sum W*G, sum |W*G|, sum |W|] (float64 accumulator of 3 elements)."""
    if g is not None and g.shape != w.shape:
        raise ValueError(f"taylor_stats_: gradient shape {tuple(g.shape)} != weight shape {tuple(w.shape)}")
    if acc.dtype != torch.float64 or acc.numel() != 3:
        raise ValueError("taylor_stats_: acc must be a float64 tensor of 3 elements")
    w = w.contiguous()
    g = None if g is None else g.contiguous()
    _, impl = _backend.select("taylor_stats", w.device)
    impl(w, g, acc)


@taylor_stats_.register_fake
def _(w: Tensor, g: Optional[Tensor], acc: Tensor) -> None:
    return None
