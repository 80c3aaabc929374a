"""Op microbenchmarks: `pytest benchmarks/bench_ops.py --benchmark-only`.

Each case records the bytes it reads (`extra_info["bytes"]`; a copy counts read + write, the
STREAM convention) so GB/s = bytes / mean time. `python benchmarks/bench_ops_table.py` turns the
same cases into the results table (benchmarks/results/ops.md).
"""
from __future__ import annotations

import pytest
import torch
from _ops_cases import (
    INPUT_BYTES,
    copy_fn,
    cosine_fused,
    cosine_torch,
    make_mask,
    make_pair,
    taylor_fused,
    taylor_torch,
)

pytest.importorskip("pytest_benchmark")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=list(DTYPES))
def pair(request):
    x, y = make_pair(DTYPES[request.param])
    return request.param, x, y, make_mask(x.shape[0])


def _run(benchmark, fn, nbytes, label):
    benchmark.extra_info["bytes"] = nbytes
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9


@pytest.mark.parametrize("impl", ["fused_cpu", "torch"])
def test_cosine(benchmark, pair, impl):
    name, x, y, mask = pair
    acc = torch.zeros(3, dtype=torch.float64)
    fn = cosine_fused if impl == "fused_cpu" else cosine_torch
    _run(benchmark, lambda: fn(x, y, mask, acc), INPUT_BYTES, f"cosine[{impl}-{name}]")


@pytest.mark.parametrize("impl", ["fused_cpu", "torch"])
def test_taylor(benchmark, pair, impl):
    name, w, g, _ = pair
    acc = torch.zeros(3, dtype=torch.float64)
    fn = taylor_fused if impl == "fused_cpu" else taylor_torch
    _run(benchmark, lambda: fn(w, g, acc), INPUT_BYTES, f"taylor[{impl}-{name}]")


def test_copy(benchmark, pair):
    name, x, y, _ = pair
    src = torch.cat([x.reshape(-1), y.reshape(-1)])
    dst = torch.empty_like(src)
    _run(benchmark, copy_fn(src, dst), 2 * INPUT_BYTES, f"copy[{name}]")
