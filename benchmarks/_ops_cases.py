"""Shared cases of the op microbenchmarks (bench_ops.py under pytest-benchmark, bench_ops_table.py
for the results table): the fused CPU kernels, the torch composition they replace, and a plain
copy of the same bytes as the memory-bandwidth yardstick."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from shortllm.ops import _cpu_backend

MB = 1 << 20
INPUT_BYTES = 64 * MB  # x and y (or W and G): 32 MB each


def make_pair(dtype: torch.dtype, d: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = (INPUT_BYTES // 2) // (d * torch.empty(0, dtype=dtype).element_size())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    y = (0.5 * x.float() + torch.randn(n, d, generator=g)).to(dtype)
    return x, y


def make_mask(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.9


def cosine_fused(x, y, mask, acc) -> None:
    _cpu_backend.cosine_stats(x, y, mask, acc)


def cosine_torch(x, y, mask, acc) -> None:
    # what the scorer would do without the kernel: F.cosine_similarity + masked sums
    cos = F.cosine_similarity(x, y, dim=-1).double().clamp(-1, 1)
    ang = torch.arccos(cos) / math.pi
    m = mask.double()
    acc.add_(torch.stack([(cos * m).sum(), (ang * m).sum(), m.sum()]))


def taylor_fused(w, g, acc) -> None:
    _cpu_backend.taylor_stats(w, g, acc)


def taylor_torch(w, g, acc) -> None:
    p = w.float() * g.float()
    acc.add_(torch.stack([p.sum(dtype=torch.float64), p.abs().sum(dtype=torch.float64),
                          w.abs().sum(dtype=torch.float64)]))


def copy_fn(src: torch.Tensor, dst: torch.Tensor) -> Callable[[], None]:
    return lambda: dst.copy_(src)
