"""Fault tests for outputs: a killed export leaves the target absent or complete; concurrent exports to
one dir: one wins, none corrupt; shortllm's loaders never unpickle."""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny

HERE = Path(__file__).resolve().parent

_EXPORT_SCRIPT = r"""
import sys
sys.path.insert(0, {here!r})
from tiny_models import make_tiny
from shortllm.pruning.exporting import export
model = make_tiny("llama", num_layers=8, seed=11)
print("go", flush=True)
export(model, sys.argv[1], max_shard_size="100KB")
print("done", flush=True)
"""


def _assert_complete(out: Path, seed: int = 11) -> None:
    import transformers

    from shortllm.io.checkpoint_files import check_index

    check_index(out)
    assert (out / "shortllm.json").is_file() and (out / "config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = make_tiny("llama", num_layers=8, seed=seed)
    got = dict(loaded.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(got[name], p), f"{out}: {name} differs from the exported model"


def test_kill_during_export_leaves_target_absent_or_complete(tmp_path):
    seed = int(os.environ.get("SHORTLLM_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    script = _EXPORT_SCRIPT.format(here=str(HERE))
    outcomes = []
    for k in range(3):
        out = tmp_path / f"out{k}"
        proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, cwd=tmp_path,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert proc.stdout.readline().strip() == "go", proc.stderr.read()[-2000:]
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if out.exists():
            _assert_complete(out)
            outcomes.append("complete")
        else:
            outcomes.append("absent")
    # the target name never holds a partial export; leftovers may only be hidden temp dirs beside it
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == sorted(f"out{k}" for k, o in enumerate(outcomes) if o == "complete"), (seed, visible)


def test_concurrent_exports_to_one_dir_one_wins_none_corrupt(tmp_path):
    from shortllm.errors import ExportError
    from shortllm.pruning.exporting import export

    models = {11: make_tiny("llama", num_layers=8, seed=11), 12: make_tiny("llama", num_layers=8, seed=12)}
    out = tmp_path / "same"
    barrier = threading.Barrier(len(models))
    results: dict[int, object] = {}

    def run(seed):
        barrier.wait()
        try:
            results[seed] = export(models[seed], out, max_shard_size="100KB")
        except ExportError as exc:
            results[seed] = exc

    threads = [threading.Thread(target=run, args=(s,)) for s in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    winners = [s for s, r in results.items() if not isinstance(r, Exception)]
    assert len(results) == 2 and len(winners) == 1, results
    loser = next(r for r in results.values() if isinstance(r, Exception))
    assert str(out) in str(loser)
    _assert_complete(out, seed=winners[0])  # the winner's weights, whole: never a mix of the two
    assert [p.name for p in tmp_path.iterdir()] == ["same"], "the loser left temp files behind"


class _Payload:
    """Unpickling this creates `marker`: proof that a loader executed a planted pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(directory: Path, marker: Path) -> None:
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "scores.pkl", "rng_state.pth"):
        with open(directory / name, "wb") as f:
            pickle.dump(_Payload(str(marker)), f)


def test_loaders_never_unpickle(tmp_path):
    from shortllm.errors import ModelLoadError
    from shortllm.model.loading import load_model
    from shortllm.pruning.exporting import export
    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.scores import Scores

    marker = tmp_path / "PWNED"
    with open(tmp_path / "probe.pkl", "wb") as f:  # the payload works when something does unpickle it
        pickle.dump(_Payload(str(marker)), f)
    with open(tmp_path / "probe.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    model = make_tiny("llama", num_layers=3, seed=4)
    ckpt = export(model, tmp_path / "ckpt")
    _plant(ckpt, marker)
    loaded, _ = load_model(str(ckpt))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    batches = [{"input_ids": torch.randint(1, 128, (2, 7))}] * 3
    res = tmp_path / "res"
    scores = score_fast(loaded, batches, metrics=("bi", "taylor"), progress=False, checkpoint=str(res), every=1)
    _plant(res, marker)
    scores.save(tmp_path / "s.json")
    Scores.load(tmp_path / "s.json", model=loaded)
    again = score_fast(loaded, batches, metrics=("bi", "taylor"), progress=False, checkpoint=str(res), every=1)
    assert torch.equal(again.values["bi"], scores.values["bi"])

    # a checkpoint dir with only a pickle is refused, not executed
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    model.config.save_pretrained(only_pickle)
    _plant(only_pickle, marker)
    # torch's weights_only unpickler rejects the payload; transformers versions that refuse torch.load
    # outright raise ValueError instead, which load_model wraps
    with pytest.raises((pickle.UnpicklingError, ModelLoadError)):
        load_model(str(only_pickle))
    assert not marker.exists(), "a planted pickle was executed by a shortllm loader"
