"""Subprocess side of the distributed, resume and determinism tests (not a test module).

    python tests/scoring_worker.py SPEC.json OUT_DIR          # plain process
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/scoring_worker.py SPEC.json OUT_DIR

SPEC: {"threads": int, "jobs": [job, ...]}; a job names a tiny model and a calibration set built
deterministically from seeds (`build_model`, `build_data`, shared with the in-process references) and
the `score_fast` arguments. Each job's Scores go to OUT_DIR/<name>.rank<r>.safetensors (values + n_tokens).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import make_tiny, random_batch  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_model(job: dict) -> torch.nn.Module:
    return make_tiny(job.get("model", "llama"), num_layers=job.get("layers", 5), seed=job.get("seed", 0),
                     dtype=DTYPES[job.get("dtype", "float32")])


def build_data(job: dict) -> list[dict]:
    """Batches of different sizes and lengths, right-padded rows of different lengths."""
    n = job.get("n_batches", 7)
    return [random_batch(batch=1 + i % 3, seq=6 + (5 * i) % 11, seed=1000 + i) for i in range(n)]


def score_job(job: dict):
    from shortllm.scoring.engine import score_fast

    kwargs = dict(job.get("kwargs", {}))
    if job.get("checkpoint"):
        kwargs.update(checkpoint=job["checkpoint"], every=job.get("every", 1))
    data = build_data(job)
    if job.get("calib"):  # CalibrationData shards itself (`.shard`); plain lists go round-robin
        from shortllm.data.calibration import CalibrationData

        data = CalibrationData(data, {"source": "tiny"})
    if job.get("batch_delay"):  # the kill test needs every batch to last a while, however fast the machine is
        data = _Slow(data, float(job["batch_delay"]))
    return score_fast(build_model(job), data, metrics=tuple(job["metrics"]), progress=False, **kwargs)


class _Slow(list):
    """The same batches (a list, so the same data fingerprint), each handed out after a pause."""

    def __init__(self, batches, delay: float):
        super().__init__(batches)
        self.delay = delay

    def __iter__(self):
        import time

        for b in super().__iter__():
            time.sleep(self.delay)
            yield b


def ops_job(job: dict) -> dict:
    """The fused reductions on fixed random inputs with odd shapes (big enough to split over threads)."""
    from shortllm.ops import cosine_stats_, lm_head_nll, taylor_stats_

    g = torch.Generator().manual_seed(job.get("seed", 3))
    x, y = torch.randn(4099, 96, generator=g), torch.randn(4099, 96, generator=g)
    mask = torch.rand(4099, generator=g) > 0.2
    cos = torch.zeros(3, dtype=torch.float64)
    cosine_stats_(x, y, mask, cos)
    w, gr = torch.randn(300007, generator=g), torch.randn(300007, generator=g)
    tay = torch.zeros(3, dtype=torch.float64)
    taylor_stats_(w, gr, tay)
    h, head = torch.randn(37, 64, generator=g), torch.randn(515, 64, generator=g)
    nll = lm_head_nll(h, head, torch.randint(0, 515, (37,), generator=g)).double()
    return {"cosine": cos, "taylor": tay, "lm_head_nll": nll}


def save_scores(scores, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in scores.values.items()}, str(path),
              metadata={"n_tokens": str(scores.meta["n_tokens"])})


def load_scores(path: Path) -> tuple[dict, int]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata()["n_tokens"])


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec.get("threads", 1)))
    rank = 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    try:
        for job in spec["jobs"]:
            path = Path(out_dir) / f"{job['name']}.rank{rank}.safetensors"
            if job.get("ops"):
                from safetensors.torch import save_file

                save_file(ops_job(job), str(path), metadata={"n_tokens": "0"})
            else:
                save_scores(score_job(job), path)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
