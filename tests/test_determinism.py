"""Determinism on CPU: the same inputs give bit-identical Scores across runs and across thread counts.

shortllm's own reductions (cosine/Taylor stats, the LM-head NLL's log-sum-exp) cut work into fixed
blocks whatever the thread count. The model's forward is torch's: its MKL GEMMs split (and round) by
thread count unless MKL's conditional numerical reproducibility is on, so thread-count invariance of
whole Scores is checked with MKL_CBWR=AVX2,STRICT (docs/reliability.md).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scoring_worker import load_scores

HERE = Path(__file__).resolve().parent
JOBS = [
    {"name": "ops", "ops": True},
    {"name": "fp32", "dtype": "float32", "metrics": ["bi", "angular", "taylor", "mag", "ppl"], "n_batches": 5},
    {"name": "bf16_streaming", "dtype": "bfloat16", "metrics": ["bi", "taylor"], "n_batches": 3,
     "kwargs": {"taylor_mode": "streaming"}},
]
STRICT = {"MKL_CBWR": "AVX2,STRICT"}


def _mkl_x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and torch.backends.mkl.is_available()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    out = {}
    for label, threads in (("a", 1), ("b", 1), ("c", 2)):
        spec = tmp / f"spec_{label}.json"
        spec.write_text(json.dumps({"threads": threads, "jobs": JOBS}))
        (tmp / label).mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(STRICT if _mkl_x86() else {})}
        proc = subprocess.run([sys.executable, str(HERE / "scoring_worker.py"), str(spec), str(tmp / label)],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[label] = {j["name"]: load_scores(tmp / label / f"{j['name']}.rank0.safetensors")[0] for j in JOBS}
    return out


def _bitwise(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0))]


@pytest.mark.parametrize("job", [j["name"] for j in JOBS])
def test_bit_identical_across_runs(runs, job):
    assert set(runs["a"][job]) and not _bitwise(runs["a"][job], runs["b"][job]), f"{job}: two runs differ"


def test_fused_reductions_bit_identical_across_thread_counts(runs):
    assert not _bitwise(runs["a"]["ops"], runs["c"]["ops"]), "shortllm's kernels depend on the thread count"


@pytest.mark.parametrize("job", ["fp32", "bf16_streaming"])
def test_scores_bit_identical_across_thread_counts(runs, job):
    if not _mkl_x86():
        pytest.skip("thread-count invariance of torch's GEMMs needs MKL's CBWR mode (x86 + MKL)")
    differ = _bitwise(runs["a"][job], runs["c"][job])
    assert not differ, f"{job}: 1 vs 2 threads differ in {differ} (MKL_CBWR=AVX2,STRICT)"
