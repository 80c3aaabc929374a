"""Data-parallel scoring on CPU: 2 ranks x 1 thread (torchrun, gloo) vs 1 rank x 2 threads, SmolLM2-135M.

    python benchmarks/bench_distributed.py [--samples 4] [--seq-len 128] [--repeats 2]

Each configuration runs in fresh processes; the time reported is `score_fast` only (model load and
imports excluded; for 2 ranks the slower rank, between two barriers), best of `--repeats`, plus the
whole launch's wall time. Writes benchmarks/results/distributed.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("bi", "angular", "taylor", "mag")
NOTE = ("Notes: the time is `score_fast` alone (imports and model load excluded). On an oversubscribed shared "
        "machine an OpenMP team of 2 threads loses much of its time at barriers waiting for a descheduled thread, "
        "while 2 single-threaded ranks synchronise once (the final all-reduce), so a high load average favours the "
        "ranks; on dedicated cores expect the two to be closer, ranks ahead when per-batch work is small and "
        "threads ahead when memory is the limit (each rank holds its own copy of the model).")


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from shortllm.data.calibration import calibration_loader
    from shortllm.model.loading import load_model
    from shortllm.scoring.engine import score_fast

    dist = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if dist:
        torch.distributed.init_process_group("gloo")
    model, tok = load_model("smollm2-135m")
    data = calibration_loader("wikitext2", tok, n_samples=args.samples, seq_len=args.seq_len, batch_size=1)
    times, scores = [], None
    for _ in range(args.repeats):
        if dist:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        scores = score_fast(model, data, metrics=METRICS, progress=False)
        if dist:
            torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
    rank = torch.distributed.get_rank() if dist else 0
    if rank == 0:
        out = {"times": times, "values": {k: v.tolist() for k, v in scores.values.items() if v.dim() == 1},
               "n_tokens": scores.meta["n_tokens"]}
        Path(args.out).write_text(json.dumps(out))
    if dist:
        torch.distributed.destroy_process_group()


def launch(nproc: int, threads: int, args, tmp: Path) -> dict:
    out = tmp / f"r{nproc}x{threads}.json"
    common = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--out", str(out),
              "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--repeats", str(args.repeats)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *common]
    else:
        cmd = [sys.executable, *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["wall"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(HERE))
    from _common import stamp

    with tempfile.TemporaryDirectory() as d:
        load_before = os.getloadavg()
        one = launch(1, 2, args, Path(d))
        two = launch(2, 1, args, Path(d))
        load_after = os.getloadavg()
    rel = max(abs(a - b) / max(abs(b), 1e-300)
              for k in one["values"] for a, b in zip(two["values"][k], one["values"][k]))
    t1, t2 = min(one["times"]), min(two["times"])
    rows = [("1 rank x 2 threads", one), ("2 ranks x 1 thread (torchrun, gloo)", two)]
    md = [
        "# Data-parallel scoring on CPU: 2 ranks x 1 thread vs 1 rank x 2 threads",
        "",
        f"Conditions: {stamp()}.",
        f"Load average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
        f"after: {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} (the 2 cores are shared with other "
        "jobs: treat the ratio as indicative).",
        f"Workload: SmolLM2-135M fp32, `score_fast(metrics={METRICS})`, WikiText-2 calibration "
        f"{args.samples} x {args.seq_len} tokens (batch 1: {args.samples} batches), best of {args.repeats}.",
        "",
        "| configuration | score_fast (s), best | all repeats (s) | launch wall incl. load (s) |",
        "|---|---|---|---|",
    ]
    for name, r in rows:
        md.append(f"| {name} | {min(r['times']):.2f} | {', '.join(f'{t:.2f}' for t in r['times'])} | {r['wall']:.1f} |")
    md += ["", f"Speed-up of 2 ranks over 2 threads: {t1 / t2:.2f}x. Max relative difference of the per-block "
               f"scores between the two: {rel:.1e} (float64 sums over shards re-associate; Taylor's exact mode also "
               "sums fp32 gradients per shard first).", "", NOTE, ""]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "distributed.md").write_text("\n".join(md))
    (HERE / "results" / "distributed.json").write_text(json.dumps({"one_rank_two_threads": one,
                                                                   "two_ranks_one_thread": two,
                                                                   "max_rel_diff": rel}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
