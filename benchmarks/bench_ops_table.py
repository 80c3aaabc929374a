"""Measure the fused CPU ops against the torch composition and a plain copy; write the table.

    python benchmarks/bench_ops_table.py [--rounds 15] [--threads 2,1] [--out benchmarks/results/ops.md]

Cases run interleaved (one call of each per round) so machine-load drift hits all of them alike;
GB/s uses the median round. Bytes: the inputs read (64 MB) for the ops; read + written for the
copy (STREAM convention), so "fraction of copy" compares against the full memory traffic of a copy.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, stamp, write_report  # noqa: E402
from _ops_cases import (  # noqa: E402
    INPUT_BYTES,
    copy_fn,
    cosine_fused,
    cosine_torch,
    make_mask,
    make_pair,
    taylor_fused,
    taylor_torch,
)

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def measure(rounds: int) -> list[dict]:
    cases = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = make_pair(dtype)
        mask = make_mask(x.shape[0])
        acc = torch.zeros(3, dtype=torch.float64)
        src = torch.cat([x.reshape(-1), y.reshape(-1)])
        dst = torch.empty_like(src)
        shape = f"2 x [{x.shape[0]}, {x.shape[1]}]"
        cases += [
            dict(op="copy", backend="torch copy_", dtype=name, shape=f"[{src.numel()}]", bytes=2 * INPUT_BYTES,
                 fn=copy_fn(src, dst)),
            dict(op="row cosine", backend="fused C++ (shortllm._cpu)", dtype=name, shape=shape, bytes=INPUT_BYTES,
                 fn=(lambda x=x, y=y, m=mask, a=acc: cosine_fused(x, y, m, a))),
            dict(op="row cosine", backend="torch composition", dtype=name, shape=shape, bytes=INPUT_BYTES,
                 fn=(lambda x=x, y=y, m=mask, a=acc: cosine_torch(x, y, m, a))),
            dict(op="taylor", backend="fused C++ (shortllm._cpu)", dtype=name, shape=shape, bytes=INPUT_BYTES,
                 fn=(lambda x=x, y=y, a=acc: taylor_fused(x, y, a))),
            dict(op="taylor", backend="torch composition", dtype=name, shape=shape, bytes=INPUT_BYTES,
                 fn=(lambda x=x, y=y, a=acc: taylor_torch(x, y, a))),
        ]
    for c in cases:  # warm-up (page faults, thread pools)
        c["fn"]()
        c["fn"]()
        c["times"] = []
    for _ in range(rounds):
        for c in cases:
            t0 = time.perf_counter()
            c["fn"]()
            c["times"].append(time.perf_counter() - t0)
    for c in cases:
        c["median_s"] = statistics.median(c["times"])
        c["gbs"] = c["bytes"] / c["median_s"] / 1e9
        c["best_gbs"] = c["bytes"] / min(c["times"]) / 1e9
    return cases


def table(cases: list[dict]) -> str:
    copy = {c["dtype"]: c for c in cases if c["op"] == "copy"}
    torch_ref = {(c["op"], c["dtype"]): c for c in cases if c["backend"] == "torch composition"}
    rows = ["| op | backend | shape | dtype | GB/s (median) | GB/s (best) | speedup vs torch (median) "
            "| fraction of copy (median) | fraction of copy (best) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        ref = torch_ref.get((c["op"], c["dtype"]))
        cp = copy[c["dtype"]]
        speed = f"{ref['median_s'] / c['median_s']:.2f}x" if ref is not None else "-"
        frac = f"{c['gbs'] / cp['gbs']:.2f}"
        frac_best = f"{c['best_gbs'] / cp['best_gbs']:.2f}"
        rows.append(f"| {c['op']} | {c['backend']} | {c['shape']} | {c['dtype']} | {c['gbs']:.1f} | "
                    f"{c['best_gbs']:.1f} | {speed} | {frac} | {frac_best} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", default=f"{torch.get_num_threads()},1",
                    help="comma-separated torch/OpenMP thread counts, one table each")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ops.md")
    args = ap.parse_args(argv)
    start_load = load_average()
    sections = []
    for nt in [int(t) for t in args.threads.split(",") if t.strip()]:
        torch.set_num_threads(nt)
        cases = measure(args.rounds)
        sections += [f"## {nt} thread{'s' if nt > 1 else ''} (torch.set_num_threads({nt}); the kernels follow it)", "",
                     table(cases), ""]
    text = "\n".join([
        "# Fused op microbenchmarks (CPU)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_machine()}; shared with other jobs: {start_load} at the start, {load_average()} at the end",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- stamp: {stamp()}",
        f"- method: `python benchmarks/bench_ops_table.py --rounds {args.rounds} --threads {args.threads}`: the "
        "cases of benchmarks/bench_ops.py, interleaved rounds; GB/s from the median round (and the best round); "
        "inputs 64 MB (two 32 MB tensors); op GB/s = input bytes / time; copy GB/s = (read + write bytes) / time "
        "(STREAM convention), so the fraction compares against a copy's full memory traffic.",
        "",
        *sections,
    ])
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
