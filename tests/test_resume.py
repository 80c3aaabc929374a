"""Resumable scoring: SIGKILL at random points, rerun, bit-identical Scores; other runs refuse to resume."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scoring_worker import build_data, build_model, load_scores, score_job

HERE = Path(__file__).resolve().parent
METRICS = ["bi", "angular", "taylor", "mag", "ppl"]


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0)) for k in a)


def _single_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker: bitwise comparisons need the same GEMM thread split
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _record(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / "checkpoint.json").read_text())
    except FileNotFoundError:
        return None


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    seed = int(os.environ.get("SHORTLLM_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    ckpt = tmp_path / "ckpt"
    job = {"name": "run", "dtype": "float32", "layers": 5, "n_batches": 24, "metrics": METRICS,
           "checkpoint": str(ckpt), "every": 1, "kwargs": {"n_max": 3}, "batch_delay": 0.1}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"threads": 1, "jobs": [job]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "scoring_worker.py"), str(spec), str(tmp_path)]
    targets = sorted(rng.sample(range(1, job["n_batches"] - 1), 5))
    kills, consumed_seen = [], []
    for target in targets:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                rec = _record(ckpt)
                if rec is not None and rec["consumed"] >= target:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.04))  # land anywhere: inside a batch or inside a checkpoint write
            assert proc.poll() is None, f"seed {seed}: worker ended before the kill: {proc.stderr.read()[-2000:]!r}"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        rec = _record(ckpt)
        # the commit record always parses and names a state file that exists: no partial checkpoint
        assert rec is not None and (ckpt / rec["state_file"]).is_file(), f"seed {seed}: broken checkpoint {rec}"
        assert not rec["complete"]
        kills.append(target)
        consumed_seen.append(rec["consumed"])
    assert consumed_seen == sorted(consumed_seen) and consumed_seen[0] >= 1, (seed, consumed_seen)
    assert not (tmp_path / "run.rank0.safetensors").exists(), "a killed run must not leave the result file"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, n_tokens = load_scores(tmp_path / "run.rank0.safetensors")
    ref = _single_thread(lambda: score_job({k: v for k, v in job.items() if k not in ("checkpoint", "batch_delay")}))
    differ = [k for k in ref.values if not _equal({k: resumed[k]}, {k: ref.values[k]})]
    assert not differ, f"seed {seed}, kills after {consumed_seen}: resumed {differ} differ"
    assert n_tokens == ref.meta["n_tokens"]
    assert not list(ckpt.glob(".*.tmp")), "temp files left behind"
    assert [p.name for p in ckpt.glob("state-*.safetensors")] == [_record(ckpt)["state_file"]]


class _Interrupt(Exception):
    pass


class _StopAfter(list):
    """The same batches (and fingerprint), but iteration raises after `n` batches: an in-process 'crash'."""

    def __init__(self, batches, n):
        from shortllm.scoring.resume import data_fingerprint

        super().__init__(batches)
        self.n, self.fingerprint = n, data_fingerprint(list(batches))

    def __iter__(self):
        for i, b in enumerate(list.__iter__(self)):
            if i == self.n:
                raise _Interrupt()
            yield b


def _score(model, data, ckpt, metrics, every=2, **kw):
    from shortllm.scoring.engine import score_fast

    return score_fast(model, data, metrics=metrics, progress=False, checkpoint=str(ckpt), every=every, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_interrupted_twice_resumes_bit_identical(tmp_path, dtype):
    """bf16: Taylor's exact mode keeps fp32 gradient buffers (saved too); fp64 keeps them in p.grad."""
    job = {"dtype": {torch.bfloat16: "bfloat16", torch.float64: "float64"}[dtype], "layers": 4, "n_batches": 9}
    model, data = build_model(job), build_data(job)
    metrics = ("bi", "angular", "taylor", "ppl")
    from shortllm.scoring.engine import score_fast

    ref = _single_thread(lambda: score_fast(model, data, metrics=metrics, progress=False))
    for cut in (3, 6):
        with pytest.raises(_Interrupt):
            _single_thread(lambda cut=cut: _score(model, _StopAfter(data, cut), tmp_path / "ck", metrics))
    rec = _record(tmp_path / "ck")
    assert rec["consumed"] == 6 and not rec["complete"]
    out = _single_thread(lambda: _score(model, data, tmp_path / "ck", metrics))
    assert _equal(out.values, ref.values)
    assert out.meta["n_tokens"] == ref.meta["n_tokens"]
    # a finished checkpoint replays to the same answer without scoring again
    again = _single_thread(lambda: _score(model, _StopAfter(data, len(data)), tmp_path / "ck", metrics))
    assert _equal(again.values, ref.values)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("partial") / "ck"
    job = {"dtype": "float32", "layers": 4, "n_batches": 5}
    model, data = build_model(job), build_data(job)
    with pytest.raises(_Interrupt):
        _score(model, _StopAfter(data, 3), ckpt, ("bi", "taylor"), n_max=2)
    return ckpt, model, data


def _other_model(model, data):
    return build_model({"dtype": "float32", "layers": 4, "seed": 5}), data


def _other_data(model, data):
    changed = [dict(b) for b in data]
    changed[1] = {**changed[1], "input_ids": changed[1]["input_ids"].flip(1)}
    return model, changed


def _fewer_batches(model, data):
    return model, data[:4]


@pytest.mark.parametrize("change, kwargs, what", [
    (_other_model, {}, "model weights"),
    (_other_data, {}, "calibration data"),
    (_fewer_batches, {}, "calibration data"),
    (None, {"metrics": ("bi",)}, "metric set"),
    (None, {"metrics": ("bi", "taylor", "mag")}, "metric set"),
    (None, {"n_max": 3}, "metric options"),
    (None, {"taylor_mode": "streaming"}, "metric options"),
], ids=["model", "data", "fewer-batches", "fewer-metrics", "more-metrics", "n_max", "taylor-mode"])
def test_mismatched_run_refuses_to_resume(partial, change, kwargs, what):
    from shortllm.errors import CheckpointError

    ckpt, model, data = partial
    if change is not None:
        model, data = change(model, data)
    kwargs = {"metrics": ("bi", "taylor"), "n_max": 2, **kwargs}
    metrics = kwargs.pop("metrics")
    with pytest.raises(CheckpointError, match=f"belongs to a different run: {what}.*same model, data, metrics"):
        _score(model, data, ckpt, metrics, **kwargs)
    assert _record(ckpt)["consumed"] == 2, "a refused resume must leave the checkpoint untouched"


def test_corrupted_or_missing_state_is_a_clear_error(tmp_path):
    from shortllm.errors import CheckpointError

    job = {"dtype": "float32", "layers": 3, "n_batches": 4}
    model, data = build_model(job), build_data(job)
    with pytest.raises(_Interrupt):
        _score(model, _StopAfter(data, 2), tmp_path / "a", ("bi",))
    rec = _record(tmp_path / "a")
    (tmp_path / "a" / rec["state_file"]).write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="missing or corrupted.*delete"):
        _score(model, data, tmp_path / "a", ("bi",))
    (tmp_path / "a" / "checkpoint.json").write_text('{"identity": {"format": ')
    with pytest.raises(CheckpointError, match="unreadable or corrupted.*delete"):
        _score(model, data, tmp_path / "a", ("bi",))
    with pytest.raises(CheckpointError, match=r"pass list\(data\)"):
        _score(model, iter(data), tmp_path / "b", ("bi",))
    with pytest.raises(CheckpointError, match="positive integer"):
        _score(model, data, tmp_path / "c", ("bi",), every=0)
