"""Data-parallel scoring (torchrun, gloo on CPU) equals one process; sharded (device_map) models score right.

One torchrun launch runs every job (a launch costs ~10 s); each job's 1-process reference is computed
here with the same model and batches (`scoring_worker.build_*`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scoring_worker import build_data, build_model, load_scores, score_job

HERE = Path(__file__).resolve().parent

# float64 sums over shards only re-associate: 1e-12 relative. Taylor's exact mode sums per-element
# gradients in the weights' dtype before the |.|, so on fp32 weights a shard split moves it at fp32 rounding.
JOBS = [
    # fp32 jobs: the 1-process reference runs in the pytest process, the ranks in torchrun workers; in a
    # fresh non-editable venv the two were seen to differ at fp32 rounding (open question, see the issue
    # notes), so fp32 compares at 1e-6 (still catching a double-counted or missing shard); the ranks agree
    # bit for bit and the fp64 jobs keep 1e-12.
    {"name": "fp32_all", "dtype": "float32", "metrics": ["bi", "angular", "mag", "taylor"], "tol": 1e-6,
     "tol_taylor": 2e-5},
    {"name": "fp64_exact", "dtype": "float64", "metrics": ["bi", "angular", "taylor", "mag"], "tol": 1e-12},
    {"name": "fp32_streaming_last", "dtype": "float32", "metrics": ["angular", "taylor", "bi"], "tol": 1e-6,
     "kwargs": {"taylor_mode": "streaming", "angular_tokens": "last", "n_max": 3}},
    {"name": "ppl", "dtype": "float32", "metrics": ["ppl", "bi"], "tol": 1e-12, "n_batches": 5},
    {"name": "qwen2_calib", "model": "qwen2", "dtype": "float64", "layers": 4, "metrics": ["taylor", "bi"],
     "tol": 1e-12, "calib": True, "n_batches": 6},
    {"name": "fp64_resumable", "dtype": "float64", "metrics": ["bi", "taylor"], "tol": 1e-12, "checkpoint": True,
     "every": 2},
]


def _have_ppl() -> bool:
    try:
        import shortllm.scoring.ppl  # noqa: F401
    except ImportError:
        return False
    return True


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    nan = torch.isnan(b)
    if not torch.equal(torch.isnan(a), nan):
        return False
    a, b = a[~nan], b[~nan]
    return bool(((a - b).abs() <= tol * b.abs() + 1e-300).all())


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    jobs = [dict(j) for j in JOBS if j["name"] != "ppl" or _have_ppl()]
    for j in jobs:
        if j.get("checkpoint"):
            j["checkpoint"] = str(tmp / f"ckpt_{j['name']}")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"threads": 1, "jobs": jobs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "scoring_worker.py"), str(spec), str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return tmp, {j["name"]: j for j in jobs}


@pytest.mark.parametrize("name", [j["name"] for j in JOBS])
def test_two_ranks_equal_one_process(torchrun_results, name):
    tmp, jobs = torchrun_results
    if name not in jobs:
        pytest.skip("shortllm.scoring.ppl not built")
    job = jobs[name]
    r0, n0 = load_scores(tmp / f"{name}.rank0.safetensors")
    r1, n1 = load_scores(tmp / f"{name}.rank1.safetensors")
    # every rank returns the same Scores, bit for bit (finish() runs on identical reduced state)
    assert set(r0) == set(r1) == set(job["metrics"])
    assert n0 == n1
    for k in r0:
        assert torch.equal(r0[k].nan_to_num(-7.0), r1[k].nan_to_num(-7.0)), f"{name}/{k}: ranks disagree"
    single_job = {k: v for k, v in job.items() if k != "checkpoint"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: torch's CPU GEMMs split work (and round) by thread count
    try:
        ref = score_job(single_job)
    finally:
        torch.set_num_threads(threads)
    assert n0 == ref.meta["n_tokens"] == sum(int(b["attention_mask"].sum()) for b in build_data(job))
    for k in job["metrics"]:
        tol = job.get(f"tol_{k}", job["tol"])
        assert _close(r0[k], ref.values[k], tol), (
            f"{name}/{k}: 2 ranks {r0[k]} vs 1 process {ref.values[k]} (tol {tol})")
    if job.get("checkpoint"):
        dirs = sorted(p.name for p in Path(job["checkpoint"]).iterdir())
        assert dirs == ["rank0-of-2", "rank1-of-2"], dirs
        rec = json.loads((Path(job["checkpoint"]) / "rank1-of-2" / "checkpoint.json").read_text())
        assert rec["complete"] and rec["consumed"] == len(build_data(job)[1::2])


def test_shard_is_disjoint_and_covers(monkeypatch):
    """shard_for_rank: every batch goes to exactly one rank (plain lists and CalibrationData alike)."""
    from shortllm.data.calibration import CalibrationData
    from shortllm.scoring import engine

    data = build_data({"n_batches": 7})
    for wrap in (list, CalibrationData):
        seen = []
        for rank in range(3):
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
            monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
            seen += [int(b["input_ids"].sum()) * 1000 + b["input_ids"].numel()
                     for b in engine.shard_for_rank(wrap(data))]
        assert sorted(seen) == sorted(int(b["input_ids"].sum()) * 1000 + b["input_ids"].numel() for b in data)


# ---- sharded models (accelerate device_map with CPU / disk offload) -----------------------------------

@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    import transformers

    tmp = tmp_path_factory.mktemp("offload")
    job = {"dtype": "float32", "layers": 4, "n_batches": 3}
    build_model(job).save_pretrained(tmp / "ckpt")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ckpt", dtype=torch.float32).eval()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk",
                  "model.norm": "cpu", "lm_head": "cpu"}
    sharded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp / "ckpt", dtype=torch.float32, device_map=device_map, offload_folder=str(tmp / "offload")).eval()
    return plain, sharded, build_data(job)


def test_offloaded_model_scores_equal_plain_model(offloaded):
    from shortllm.scoring.engine import score_fast

    plain, sharded, data = offloaded
    assert any(p.device.type == "meta" for p in sharded.model.layers[1].parameters()), "layer 1 should be offloaded"
    metrics = ("bi", "angular", "mag") + (("ppl",) if _have_ppl() else ())
    ref = score_fast(plain, data, metrics=metrics, progress=False)
    out = score_fast(sharded, data, metrics=metrics, progress=False)
    for k in metrics:
        assert _close(out.values[k], ref.values[k], 1e-12), f"{k}: {out.values[k]} vs {ref.values[k]}"
    assert out.values["mag"].min() > 0
    # the offloaded blocks went back to the meta device: scoring materialised nothing permanently
    assert all(p.device.type == "meta" for p in sharded.model.layers[3].parameters())


def test_offloaded_model_taylor_refuses_clearly(offloaded):
    from shortllm.errors import MetricError
    from shortllm.scoring.engine import score_fast

    _, sharded, data = offloaded
    with pytest.raises(MetricError, match="offloaded by device_map.*score_checkpoint"):
        score_fast(sharded, data, metrics=("taylor",), progress=False)


def test_device_map_without_offload_scores_taylor(tmp_path):
    """Blocks placed by a device_map (all on the one device here) with accelerate hooks: Taylor works."""
    import transformers

    from shortllm.scoring.engine import score_fast

    job = {"dtype": "float32", "layers": 3, "n_batches": 2}
    build_model(job).save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mapped = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, device_map={"model": "cpu", "lm_head": "cpu"}).eval()
    data = build_data(job)
    ref = score_fast(plain, data, metrics=("taylor", "bi"), progress=False)
    out = score_fast(mapped, data, metrics=("taylor", "bi"), progress=False)
    for k in ("taylor", "bi"):
        assert torch.equal(out.values[k], ref.values[k]), k
