"""Parameter accounting for plans: unique parameter counts, and how many blocks of a removal order reach a
parameter ratio (the papers' "20% / 35%" are shares of the parameters, not of the blocks)."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def count_params(modules) -> int:
    """Unique parameters of one module or several (a tied weight counts once)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen: dict[int, int] = {}
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def blocks_for_ratio(ratio: float, order: Sequence[int], block_params: Sequence[int], total: int) -> int:
    """How many blocks, taken from the front of removal ``order``, bring the removed share of the
    ``total`` parameter count closest to ``ratio`` (at least one; ties keep the smaller count)."""
    best_k, best_err, acc = 1, float("inf"), 0
    for k, i in enumerate(order, start=1):
        acc += block_params[i]
        err = abs(acc / total - ratio)
        if err < best_err - 1e-12:
            best_k, best_err = k, err
    return best_k
