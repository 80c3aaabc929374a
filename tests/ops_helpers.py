"""Shared by the op tests: the Triton interpreter guard, uninitialised-memory poisoning and padding rows
planted with NaN/Inf (the `backend` fixture is in conftest.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch


def need_triton(monkeypatch) -> None:
    pytest.importorskip("triton")
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; export TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty/empty_like fill float tensors with NaN inside this block (deterministic mode), so any
    output or partial-sum slot a kernel fails to write shows up as NaN instead of stale memory."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory, "test setup: NaN fill must be on"
    assert torch.isnan(torch.empty(4)).all(), "test setup: torch.empty must come back NaN-filled"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def padding_mask(n: int, seed: int, seq: int = 8) -> torch.Tensor:
    """Validity mask of n flattened rows cut into right-padded sequences of `seq` tokens: each sequence
    keeps a random-length prefix. At least one padded row always; at least one valid row when n > 1."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    for s in range(0, n, seq):
        e = min(n, s + seq)
        keep = int(torch.randint(0, e - s + 1, (1,), generator=g))
        mask[s:s + keep] = True
    mask[-1] = False
    if n > 1:
        mask[0] = True
    return mask


def plant_nonfinite(tensors: list[torch.Tensor], padded: torch.Tensor, seed: int) -> None:
    """In place: write NaN / +Inf / -Inf into the padded rows (padded[r] true) of the [N, D] `tensors`,
    rotating patterns (one element, the whole row, mixed signs) so every padded row is non-finite."""
    g = torch.Generator().manual_seed(seed)
    rows = padded.nonzero().flatten().tolist()
    inf, nan = float("inf"), float("nan")
    for i, r in enumerate(rows):
        d = tensors[0].shape[1]
        j = int(torch.randint(0, d, (1,), generator=g))
        kind = i % 4
        for k, t in enumerate(tensors):
            if kind == 0:
                t[r, j] = nan if k == 0 else t[r, j]
            elif kind == 1:
                t[r, j] = inf if k == len(tensors) - 1 else -inf
            elif kind == 2:
                t[r] = -inf if k == 0 else inf
            else:
                t[r] = nan
        assert not all(torch.isfinite(t[r]).all() for t in tensors), "test setup: padded row left finite"
