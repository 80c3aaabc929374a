"""Fused span cosine (`cosine_span_stats_`, one call per block) vs the single-pair op (`cosine_stats_`, one
call per span) on the BI + angular workload of SmolLM2-135M; writes benchmarks/results/cosine_span.md.

    python benchmarks/bench_cosine_span.py [--rounds 15] [--threads 2,1] [--forward-reps 3] [--out ...]

Workload of one calibration batch of 4 x 512 tokens (N = 2048 rows, D = 576, fp32, all tokens valid, the
scorer passes its validity mask): at each of the L = 30 block outputs y = h_{j+1}, the k = min(8, j + 1) spans
ending there, each against a ring entry h_{j+1-n}. "single" is the scorer's former loop (k `cosine_stats_`
calls, each re-reading y and its norms); "fused" is its current single `cosine_span_stats_` call into the
anti-diagonal of the [n_max, L, 3] accumulator. Both go through the public ops (dispatch included), cpu
backend, alternating in one process (one batch of each per round); medians over rounds. The per-call rows
time k = 8 on one y. The share of a forward divides the per-batch medians by the median of `--forward-reps`
plain `model.base_model(...)` forwards on 4 x 512 random tokens (0 skips it: no model load).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, stamp, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
L, N_MAX, N, D = 30, 8, 4 * 512, 576


def _states(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(N, D, generator=g)]
    for _ in range(L):  # a residual stream: each block adds a little to the last state
        hs.append(hs[-1] + 0.3 * torch.randn(N, D, generator=g))
    return [h.to(dtype) for h in hs]


def _cases(dtype: torch.dtype) -> dict:
    from shortllm.ops import cosine_span_stats_, cosine_stats_

    hs = _states(dtype)
    mask = torch.ones(N, dtype=torch.bool)
    acc_f = torch.zeros(N_MAX, L, 3, dtype=torch.float64)
    acc_s = torch.zeros(N_MAX, L, 3, dtype=torch.float64)
    s0, s1, s2 = acc_f.stride()

    def batch_fused() -> None:
        for j in range(L):
            k = min(N_MAX, j + 1)
            diag = acc_f.as_strided((k, 3), (s0 - s1, s2), j * s1)
            cosine_span_stats_([hs[j - i] for i in range(k)], hs[j + 1], mask, diag)

    def batch_single() -> None:
        for j in range(L):
            for n in range(1, min(N_MAX, j + 1) + 1):
                cosine_stats_(hs[j + 1 - n], hs[j + 1], mask, acc_s[n - 1, j + 1 - n])

    y, xs = hs[L], [hs[L - 1 - i] for i in range(N_MAX)]
    one_f = torch.zeros(N_MAX, 3, dtype=torch.float64)
    one_s = torch.zeros(N_MAX, 3, dtype=torch.float64)

    def call_fused() -> None:
        cosine_span_stats_(xs, y, mask, one_f)

    def call_single() -> None:
        for i, x in enumerate(xs):
            cosine_stats_(x, y, mask, one_s[i])

    fns = {"batch fused": batch_fused, "batch single": batch_single, "call fused": call_fused,
           "call single": call_single}
    return fns, (acc_f, acc_s, one_f, one_s)


def measure(dtype: torch.dtype, rounds: int) -> dict:
    fns, (acc_f, acc_s, one_f, one_s) = _cases(dtype)
    for f in fns.values():  # warm-up (page faults, thread pools)
        f()
    for t in (acc_f, acc_s, one_f, one_s):
        t.zero_()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    same = torch.equal(acc_f, acc_s) and torch.equal(one_f, one_s)
    return {"median": {k: statistics.median(v) for k, v in times.items()},
            "best": {k: min(v) for k, v in times.items()}, "bit_identical": same}


def forward_time(reps: int) -> float | None:
    if reps <= 0:
        return None
    from shortllm.model.loading import load_model

    model, _ = load_model("smollm2-135m")
    ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    ts = []
    with torch.no_grad():
        model.base_model(input_ids=ids, attention_mask=am, use_cache=False)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model.base_model(input_ids=ids, attention_mask=am, use_cache=False)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", default=f"{torch.get_num_threads()},1",
                    help="comma-separated torch/OpenMP thread counts, one table each")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--forward-reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cosine_span.md")
    args = ap.parse_args(argv)
    if args.rounds < 5:
        ap.error("--rounds must be at least 5 (medians)")
    os.environ["SHORTLLM_BACKEND"] = "cpu"  # fail loudly if the extension is missing
    start_load = load_average()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    threads0 = torch.get_num_threads()
    sections, fwd_lines = [], []
    fused_fp32 = {}
    for nt in [int(t) for t in args.threads.split(",") if t.strip()]:
        torch.set_num_threads(nt)
        rows = ["| dtype | workload | single (median) | fused (median) | fused ÷ single (median) | "
                "single (best) | fused (best) | fused ÷ single (best) | bit-identical |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name in [s.strip() for s in args.dtypes.split(",") if s.strip()]:
            r = measure(dtypes[name], args.rounds)
            med, best = r["median"], r["best"]
            for what, label in (("batch", f"one batch: {L} blocks, 240 spans"), ("call", "one y, k = 8")):
                s, f = med[f"{what} single"], med[f"{what} fused"]
                sb, fb = best[f"{what} single"], best[f"{what} fused"]
                rows.append(f"| {name} | {label} | {s * 1e3:.2f} ms | {f * 1e3:.2f} ms | {f / s:.3f} | "
                            f"{sb * 1e3:.2f} ms | {fb * 1e3:.2f} ms | {fb / sb:.3f} | {r['bit_identical']} |")
            if name == "fp32":
                fused_fp32[nt] = (med["batch single"], med["batch fused"])
        sections += [f"## {nt} thread{'s' if nt > 1 else ''} (torch.set_num_threads({nt}); a kernel takes a team from "
                     "32 MB read: each single call reads 9.4 MB (one thread), a fused call 42 MB (the team))",
                     "", *rows, ""]
    torch.set_num_threads(threads0)
    fwd = forward_time(args.forward_reps)
    if fwd is not None:
        fwd_lines = ["## Share of a plain forward (fp32)", "",
                     f"`model.base_model(...)` on 4 x 512 tokens, {torch.get_num_threads()} threads: median of "
                     f"{args.forward_reps}: {fwd:.3f} s.", "",
                     "| threads | single per batch ÷ forward | fused per batch ÷ forward |", "|---|---|---|"]
        for nt, (s, f) in fused_fp32.items():
            fwd_lines.append(f"| {nt} | {s / fwd:.4f} | {f / fwd:.4f} |")
        fwd_lines.append("")
    text = "\n".join([
        "# Fused span cosine vs single-pair calls (CPU)",
        "",
        f"- stamp: {stamp()}",
        f"- load: {start_load} at the start, {load_average()} at the end (2-core machine, other jobs may share it)",
        f"- method: `python benchmarks/bench_cosine_span.py --rounds {args.rounds} --threads {args.threads} "
        f"--dtypes {args.dtypes} --forward-reps {args.forward_reps}`: " + " ".join(__doc__.split("\n\n")[2].split()),
        "",
        *sections,
        *fwd_lines,
    ])
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
