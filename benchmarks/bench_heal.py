"""Training-free seam healing on SmolLM2-135M, and the Gram op's speed.

    python benchmarks/bench_heal.py              # writes benchmarks/results/heal.{json,md}
    python benchmarks/bench_heal.py --gram-only  # re-times the Gram op only (after a kernel change), keeps the rest

- Plans: BI scores from 32 x 128 WikiText-2 calibration tokens (validation split, random windows, seed 0);
  make_plan(scores, "bi", ratio=r) for r = 0.20 and 0.35.
- Each plan pruned without healing and healed with lstsq, cosine and channel (heal() on the same 32 x 128
  calibration batches), then WikiText-2 test perplexity on a fixed slice: the first 32 chunks of 128 tokens
  (llm-pruner protocol). A slice, not the full test set: the numbers compare methods, not papers.
- Gram op: x^T x and x^T y of [4096, 576] rows (SmolLM2's width, one 32 x 128 batch) with a padding mask, the
  C++ kernel vs the float64 PyTorch reference, median of 5, torch threads fixed.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
sys.path.insert(0, str(HERE))

from _common import load_average, stamp_dict, write_report  # noqa: E402

RATIOS = (0.20, 0.35)
METHODS = (None, "lstsq", "cosine", "channel")
CALIB = dict(n_samples=32, seq_len=128, batch_size=8, seed=0)
EVAL = dict(seq_len=128, max_chunks=32)
THREADS = 2


def _ppl(model, tok) -> float:
    from shortllm.evaluation.corpus_ppl import perplexity

    return float(perplexity(model, tok, "wikitext2", batch_size=8, progress=False, **EVAL).ppl)


def _gram_timing() -> list[dict]:
    from shortllm.ops import _backend
    from shortllm.ops.gram import gram_ref

    rows = []
    n, d = 4096, 576
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, dtype=torch.bool)
    mask[n - 300:] = False
    impls = {"ref": _backend._REF["gram_stats"]}
    if _backend.available_backends()["cpu"]:
        from shortllm.ops import _cpu_backend

        impls["cpu"] = _cpu_backend.IMPLS["gram_stats"]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, d, generator=g).to(dtype)
        y = torch.randn(n, d, generator=g).to(dtype)
        want = gram_ref(x, y, mask)
        for threads in (1, THREADS):
            torch.set_num_threads(threads)
            for name, fn in impls.items():
                times = []
                for _ in range(5):
                    a = torch.zeros(d, d, dtype=torch.float64)
                    b = torch.zeros(d, d, dtype=torch.float64)
                    t0 = time.perf_counter()
                    fn(x, y, mask, a, b)
                    times.append(time.perf_counter() - t0)
                err = max(float(((a - want[0]).abs()).max()), float(((b - want[1]).abs()).max()))
                rows.append({"dtype": str(dtype)[6:], "threads": threads, "backend": name,
                             "ms": 1e3 * statistics.median(times), "max_abs_err_vs_ref": err})
    torch.set_num_threads(THREADS)
    return rows


def main() -> None:
    if "--gram-only" in sys.argv[1:]:
        res = json.loads((OUT / "heal.json").read_text())
        torch.set_num_threads(THREADS)
        start = load_average()
        res["gram"] = _gram_timing()
        res["gram_stamp"] = {**stamp_dict(), "load_average": {"start": start, "end": load_average()}}
        (OUT / "heal.json").write_text(json.dumps(res, indent=1))
        write_report(OUT / "heal.md", _markdown(res))
        return
    from shortllm.data.calibration import calibration_loader
    from shortllm.model.loading import load_model
    from shortllm.pruning.healing import heal
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.removal import prune
    from shortllm.scoring.engine import score_fast

    torch.set_num_threads(THREADS)
    load_start = load_average()
    t_start = time.perf_counter()
    base, tok = load_model("smollm2-135m")
    data = calibration_loader("wikitext2", tok, **CALIB)
    scores = score_fast(base, data, metrics=("bi",), progress=False)
    res = {"stamp": stamp_dict(), "calibration": {"corpus": "wikitext2", "split": "validation", **CALIB},
           "eval": {"corpus": "wikitext2", "split": "test", "protocol": "llm-pruner", **EVAL},
           "threads": THREADS, "unpruned_ppl": _ppl(base, tok), "runs": []}
    for ratio in RATIOS:
        for method in METHODS:
            model = copy.deepcopy(base)
            plan = make_plan(scores, "bi", model=model, ratio=ratio)
            t0 = time.perf_counter()
            report = None
            if method is None:
                prune(model, plan)
            else:
                report = heal(model, plan, data, method=method, progress=False)
            took = time.perf_counter() - t0
            row = {"ratio": ratio, "method": method or "none", "removed": plan.removed,
                   "removed_fraction": plan.removed_fraction, "ppl": _ppl(model, tok), "heal_s": took,
                   "spans": [] if report is None else [vars(s) for s in report.spans],
                   "skipped": [] if report is None else report.skipped}
            res["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("ratio", "method", "ppl", "heal_s")}), flush=True)
            del model
    res["gram"] = _gram_timing()
    res["wall_s"] = time.perf_counter() - t_start
    res["load_average"] = {"start": load_start, "end": load_average()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "heal.json").write_text(json.dumps(res, indent=1))
    write_report(OUT / "heal.md", _markdown(res))


def _markdown(res: dict) -> str:
    lines = ["## heal", "", "Training-free seam healing (`shortllm.pruning.healing.heal`) on SmolLM2-135M: BI plans at "
             "20% and 35% of the parameters, pruned without healing and healed with each method. WikiText-2 test "
             f"perplexity on a fixed slice (first {EVAL['max_chunks']} chunks of {EVAL['seq_len']} tokens); "
             f"calibration {CALIB['n_samples']} x {CALIB['seq_len']} WikiText-2 validation tokens (seed 0). "
             f"Unpruned: **{res['unpruned_ppl']:.2f}**.", "",
             "| ratio | removed blocks | method | PPL | heal time (s) | fitted objective: none -> healed (per span) |",
             "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        obj = "; ".join(f"{s['start']}..{s['end'] - 1}: {s['before']:.4g} -> {s['after']:.4g} ({s['objective']})"
                        for s in r["spans"]) or "-"
        lines.append(f"| {r['ratio']:.0%} | {r['removed']} | {r['method']} | {r['ppl']:.2f} | {r['heal_s']:.1f} "
                     f"| {obj} |")
    lines += ["", "Gram op (`shortllm.ops.gram_`, [4096, 576] rows, 300 padded, median of 5):", "",
              "| dtype | threads | backend | ms | max abs err vs fp64 ref |", "|---|---|---|---|---|"]
    for g in res["gram"]:
        lines.append(f"| {g['dtype']} | {g['threads']} | {g['backend']} | {g['ms']:.1f} "
                     f"| {g['max_abs_err_vs_ref']:.2e} |")
    if "gram_stamp" in res:
        g = res["gram_stamp"]
        dirty = " (dirty tree)" if g["dirty"] else ""
        lines += ["", f"Gram timings re-measured {g['date']} at commit {g['commit']}{dirty} (`--gram-only`); "
                  f"{g['load_average']['start']} at start, {g['load_average']['end']} at end."]
    s = res["stamp"]
    lines += ["", f"Whole run {res['wall_s']:.0f} s with {res['threads']} torch threads, nice 10; "
              f"{res['load_average']['start']} at start, {res['load_average']['end']} at end (a shared machine: the "
              "heal times are wall seconds under that load).", "",
              f"_{s['date']}; {s['cpu']}, {s['cores']} cores; python {s['python']}, torch {s['torch']}, transformers "
              f"{s['transformers']}; commit {s['commit']}{' (dirty tree)' if s['dirty'] else ''}; "
              "`python benchmarks/bench_heal.py`._", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
