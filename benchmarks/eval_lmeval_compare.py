"""The built-in zero-shot scorer against lm-eval-harness on the same items (issue 16 item 2).

    python benchmarks/eval_lmeval_compare.py [--limit 50] [--threads 2] [--models tiny,smollm2-135m]

For each model and each of the 7 zero-shot tasks (first --limit items of the local files), runs
`shortllm.evaluation.zero_shot.zeroshot` and `shortllm.evaluation.harness.harness_eval` (lm-eval 0.4.13,
HFLM on the same in-memory model) and compares per choice log-likelihoods, per item predictions and the
task metrics; times both (wall, same process, same threads). Writes results/eval_lmeval.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import load_average, stamp, stamp_dict, write_report  # noqa: E402

SEVEN = ["boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa"]


def compare(model, tok, tasks, limit: int, batch_size: int) -> dict:
    """Per task: max |Δ loglik|, items whose acc / acc_norm prediction differs, both metrics, and times."""
    from shortllm.data.tasks import load_task
    from shortllm.evaluation.harness import harness_eval
    from shortllm.evaluation.zero_shot import zeroshot

    for name in tasks:  # both paths parse the files through this (cached) reader: keep parsing out of the times
        load_task(name)
    # CPU time of this process too: on a shared machine the wall time depends on the other jobs
    t0, c0 = time.perf_counter(), time.process_time()
    ours = zeroshot(model, tok, tasks, limit=limit, batch_size=batch_size, progress=False, return_details=True)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    ref = harness_eval(model, tok, tasks, limit=limit, batch_size=batch_size, log_samples=True)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
    out = {}
    for name in tasks:
        mine = ours.tasks[name]["details"]
        theirs = sorted(ref.samples[name], key=lambda s: s["doc_id"])
        assert len(mine) == len(theirs), f"{name}: {len(mine)} vs {len(theirs)} items"
        dmax, pred_diff, norm_diff = 0.0, 0, 0
        for d, s in zip(mine, theirs):
            lls = [float(r[0][0]) for r in s["resps"]]
            dmax = max(dmax, max(abs(a - b) for a, b in zip(d["lls"], lls)))
            pred_diff += int(s["acc"] != float(d["pred"] == d["gold"]))
            if "acc_norm" in s:
                norm_diff += int(s["acc_norm"] != float(d["pred_norm"] == d["gold"]))
        metric = ours.tasks[name]["metric"]
        out[name] = {"n": len(mine), "max_abs_dll": dmax, "acc_pred_diff": pred_diff, "acc_norm_pred_diff": norm_diff,
                     "builtin": ours.tasks[name]["score"], "lm_eval": ref.tasks[name].get(metric), "metric": metric,
                     "builtin_acc": ours.tasks[name]["acc"], "lm_eval_acc": ref.tasks[name]["acc"]}
    return {"tasks": out, "builtin_s": round(t_ours, 2), "lm_eval_s": round(t_ref, 2),
            "builtin_cpu_s": round(c_ours, 2), "lm_eval_cpu_s": round(c_ref, 2),
            "builtin_mean": ours.mean, "lm_eval_mean": ref.mean}


def _render(results: dict, args, st: str, loads: tuple[str, str]) -> str:
    lines = ["# Built-in zero-shot scorer vs lm-eval-harness 0.4.13 (same items, same model in memory)", "",
             f"Measured {st} by `python benchmarks/eval_lmeval_compare.py --limit {args.limit} --threads "
             f"{args.threads}`; first {args.limit} items per task of the local files; fp32, batch size "
             f"{args.batch_size}; {loads[0]} at start, {loads[1]} at end.", ""]
    for model, r in results.items():
        lines += [f"## {model}", "", "| task | n | reported metric | built-in | lm-eval | items with another acc "
                  "prediction | another acc_norm prediction | max abs Δ log-lik |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for name, t in r["tasks"].items():
            lines.append(f"| {name} | {t['n']} | {t['metric']} | {100 * t['builtin']:.2f} | {100 * t['lm_eval']:.2f} | "
                         f"{t['acc_pred_diff']} | {t['acc_norm_pred_diff']} | {t['max_abs_dll']:.2e} |")
        lines += ["", f"Mean of 7: built-in {100 * r['builtin_mean']:.2f}, lm-eval {100 * r['lm_eval_mean']:.2f}. "
                      f"All 7 tasks: built-in {r['builtin_s']:.1f} s wall / {r['builtin_cpu_s']:.1f} s CPU, lm-eval "
                      f"{r['lm_eval_s']:.1f} s wall / {r['lm_eval_cpu_s']:.1f} s CPU (lm-eval's includes writing the "
                      "task files and loading them through `datasets`; file parsing is excluded from both).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--models", default="tiny,smollm2-135m")
    args = ap.parse_args(argv)
    import torch

    from shortllm.model.loading import load_model

    torch.set_num_threads(args.threads)
    loads = [load_average()]
    st = stamp()
    results = {}
    for name in args.models.split(","):
        if name == "tiny":
            sys.path.insert(0, str(HERE.parent / "tests"))
            from eval_helpers import make_bpe_tokenizer
            from tiny_models import make_tiny

            # a context as long as SmolLM2's: lm-eval refuses continuations longer than the model's max_length
            model, tok = make_tiny("llama", seed=0, max_position_embeddings=8192), make_bpe_tokenizer()
            label = "tiny random llama (tests/tiny_models.py, BPE tokenizer of tests/eval_helpers.py)"
        else:
            model, tok = load_model(name)
            label = f"{name} (fp32)"
        results[label] = compare(model, tok, SEVEN, args.limit, args.batch_size)
    loads.append(load_average())
    report = {"stamp": stamp_dict(), "limit": args.limit, "threads": args.threads, "results": results,
              "load": loads}
    write_report(HERE / "results" / "eval_lmeval.json", json.dumps(report, indent=2) + "\n")
    write_report(HERE / "results" / "eval_lmeval.md", _render(results, args, st, tuple(loads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
