"""End-to-end: score_fast vs a plain forward and vs the anchors' methods on SmolLM2-135M.

    python benchmarks/bench_score.py            # writes benchmarks/results/score.md

(a) bi+angular, 4 x 512 WikiText-2 tokens: time ÷ `model.base_model(...)` forward (no LM head: the work
    the scorer itself has to do) and ÷ `model(...)` (with the [B, T, V] logits it never builds), same
    process, alternating, median of 9; peak RSS over the base forward's (fresh process per variant);
    the `output_hidden_states` reference beside it (the naive method a user would otherwise run).
(b) Taylor, 10 x 128 tokens (one batch): peak RSS of score_fast ÷ the seed-000 method (full gradients
    of every parameter + fp32 salience copies, full logits), and whether the rankings agree.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import peak_rss_mb, reset_peak_rss, run_child, stamp  # noqa: E402


def _setup(n: int, seq: int, batch: int):
    import torch

    torch.manual_seed(0)
    from shortllm.data.calibration import calibration_loader
    from shortllm.model.loading import load_model

    model, tok = load_model("smollm2-135m")
    data = calibration_loader("wikitext2", tok, n_samples=n, seq_len=seq, batch_size=batch, seed=0)
    return model, list(data)


def child(variant: str) -> None:
    import torch

    import shortllm
    from shortllm.testing.reference import bi_angular_reference, taylor_reference

    if variant in ("base", "plain", "fast_bi_angular", "fast_bi", "hidden_states"):
        model, data = _setup(4, 512, 4)
        start = _same_start()
        for _ in range(2):
            if variant == "base":
                with torch.no_grad():
                    model.base_model(**data[0], use_cache=False)
            elif variant == "plain":
                with torch.no_grad():
                    model(**data[0], use_cache=False)
            elif variant == "fast_bi_angular":
                shortllm.score_fast(model, data, metrics=("bi", "angular"), progress=False)
            elif variant == "fast_bi":
                shortllm.score_fast(model, data, metrics=("bi",), progress=False)
            else:
                bi_angular_reference(model, data, n_max=8)
        print(json.dumps({"variant": variant, "peak_rss_mb": peak_rss_mb(), "work_mb": peak_rss_mb() - start}))
        return
    model, data = _setup(10, 128, 10)
    start = _same_start()
    if variant == "fast_taylor":
        s = shortllm.score_fast(model, data, metrics=("taylor",), progress=False)
        ranking = s.ranking("taylor")
    elif variant == "fast_taylor_ckpt":
        s = shortllm.score_fast(model, data, metrics=("taylor",), gradient_checkpointing=True, progress=False)
        ranking = s.ranking("taylor")
    elif variant == "seed000_taylor":
        t = taylor_reference(model, data)
        ranking = [int(i) for i in torch.argsort(t, stable=True)]
    elif variant == "plain_fwd_bwd":
        out = model(**data[0], labels=data[0]["input_ids"], use_cache=False)
        out.loss.backward()
        ranking = []
    print(json.dumps({"variant": variant, "peak_rss_mb": peak_rss_mb(), "work_mb": peak_rss_mb() - start,
                      "ranking": ranking}))


def _same_start() -> float:
    """Every variant's process starts its work from the same state: model and data loaded, and the imports a
    `torch.library` custom op pulls in on its first call (torch._dynamo, and triton when installed: ~150 MB
    of code, paid once by any process that calls such an op, whatever the op does) already done. Returns the
    RSS (MB) the work starts from, with the peak reset to it."""
    import torch

    from shortllm.ops import cosine_stats_

    cosine_stats_(torch.ones(2, 2), torch.ones(2, 2), None, torch.zeros(3, dtype=torch.float64))
    reset_peak_rss()
    return peak_rss_mb()


def timing(reps: int = 9) -> tuple[dict, dict]:
    """Each method alternates with the base forward in its own loop (base, X, base, X, ...): its ratio is
    median(X) / median(base of the same loop), so no method runs after a different neighbour than its
    baseline does (the logits' and the naive method's large allocations change the next call's page
    faults)."""
    import torch

    import shortllm
    from shortllm.testing.reference import bi_angular_reference

    model, data = _setup(4, 512, 4)

    def base():
        model.base_model(**data[0], use_cache=False)

    others = {
        "plain": lambda: model(**data[0], use_cache=False),
        "fast_bi_angular": lambda: shortllm.score_fast(model, data, metrics=("bi", "angular"), progress=False),
        "hidden_states": lambda: bi_angular_reference(model, data, n_max=8),
    }
    times: dict[str, list[float]] = {"base": []}
    ratio: dict[str, float] = {"base": 1.0}
    with torch.no_grad():
        base()  # warm-up
        for k, f in others.items():
            f()
            pair = {"base": [], k: []}
            for _ in range(reps):
                for name, fn in (("base", base), (k, f)):
                    t0 = time.perf_counter()
                    fn()
                    pair[name].append(time.perf_counter() - t0)
            times["base"] += pair["base"]
            times[k] = pair[k]
            ratio[k] = statistics.median(pair[k]) / statistics.median(pair["base"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, {"runs": times, "ratio_to_base": ratio}


def main() -> None:
    import torch
    from _common import stamp_dict

    import shortllm.ops as ops

    script = str(Path(__file__).resolve())
    t, raw = timing()
    ratio = raw["ratio_to_base"]
    rss = {v: json.loads(run_child(script, "--child", v, exact_rss=True)) for v in
           ("base", "plain", "fast_bi_angular", "fast_bi", "hidden_states", "plain_fwd_bwd", "seed000_taylor",
            "fast_taylor",
            "fast_taylor_ckpt")}
    backend = ops.select("cosine_stats", torch.device("cpu"))[0]
    st = stamp_dict()
    lines = [
        "## score_fast end to end (SmolLM2-135M, fp32, CPU)", "",
        f"Measured {stamp()}; cosine backend `{backend}`. Script: `python benchmarks/bench_score.py` "
        "(results also in `results/score.json`).", "",
        "### BI + angular (n_max = 8), 4 x 512 WikiText-2 tokens, one batch", "",
        "Time: each method alternates with the base forward in one process (9 pairs); ratios are medians over "
        "the same loop's base runs. Peak RSS: a fresh process per variant.",
        "Memory: the peak RSS the work adds to its process (model, data and the custom-op imports loaded first, "
        "the same in every variant's fresh process), and that figure over the base forward's; glibc's mmap "
        "threshold is fixed at 128 KB in these processes, so the peak follows the live tensor bytes.", "",
        "| method | time | ÷ base forward | ÷ model forward | peak RSS added by the work | over base forward |",
        "|---|---|---|---|---|---|",
    ]
    base_m = rss["base"]["work_mb"]
    for k, name in (("base", "`model.base_model(**batch)` (blocks + final norm, no LM head)"),
                    ("plain", "`model(**batch)` (with the [B, T, V] logits)"),
                    ("fast_bi_angular", "`score_fast(metrics=('bi','angular'))`"),
                    ("hidden_states", "naive: `output_hidden_states` + per-pair cosines")):
        lines.append(f"| {name} | {t[k]:.3f} s | {ratio[k]:.3f} | {ratio[k] / ratio['plain']:.3f} | "
                     f"{rss[k]['work_mb']:.0f} MB | {rss[k]['work_mb'] - base_m:+.1f} MB |")
    bi_only = rss["fast_bi"]["work_mb"] - base_m
    lines += ["", "Against `model(...)` the scorer saves the LM head's compute and memory: the logits it never "
              "builds. Against `base_model(...)` it does the same block work plus the reductions; the difference "
              "in time is the cost of the reductions (one fused `cosine_span_stats_` call per block, the 8 spans "
              "ending there) and the hooks. The memory it adds is the ring of earlier block inputs that angular "
              "spans up to n_max = 8 must keep (up to 7 x 4.7 MB here, tensors the plain forward frees): "
              f"`score_fast(metrics=('bi',))`, whose ring holds only the current input, adds {bi_only:+.1f} MB."]
    seed, fast, ck = rss["seed000_taylor"], rss["fast_taylor"], rss["fast_taylor_ckpt"]
    lines += [
        "", "### Taylor, 10 x 128 WikiText-2 tokens, one batch", "",
        "| method | peak RSS (process) | ÷ seed-000 | added by the work | ÷ seed-000 | ranking equal to seed-000 |",
        "|---|---|---|---|---|---|",
        f"| plain forward+backward (`labels=`) | {rss['plain_fwd_bwd']['peak_rss_mb']:.0f} MB | "
        f"{rss['plain_fwd_bwd']['peak_rss_mb'] / seed['peak_rss_mb']:.2f} | {rss['plain_fwd_bwd']['work_mb']:.0f} MB | "
        f"{rss['plain_fwd_bwd']['work_mb'] / seed['work_mb']:.2f} | - |",
        f"| seed-000 method (all grads + salience copies) | {seed['peak_rss_mb']:.0f} MB | 1.00 | "
        f"{seed['work_mb']:.0f} MB | 1.00 | - |",
        f"| `score_fast(metrics=('taylor',))` | {fast['peak_rss_mb']:.0f} MB | "
        f"{fast['peak_rss_mb'] / seed['peak_rss_mb']:.2f} | {fast['work_mb']:.0f} MB | "
        f"{fast['work_mb'] / seed['work_mb']:.2f} | {fast['ranking'] == seed['ranking']} |",
        f"| `score_fast(..., gradient_checkpointing=True)` | {ck['peak_rss_mb']:.0f} MB | "
        f"{ck['peak_rss_mb'] / seed['peak_rss_mb']:.2f} | {ck['work_mb']:.0f} MB | "
        f"{ck['work_mb'] / seed['work_mb']:.2f} | {ck['ranking'] == seed['ranking']} |",
        "",
        "Peak RSS (process) = VmHWM of a fresh process per method, model load included (weights ~0.54 GB).", "",
    ]
    out = HERE / "results" / "score.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    (HERE / "results" / "score.json").write_text(json.dumps(
        {"stamp": st, "backend": backend, "time_median_s": t, "time_runs_s": raw,
         "ratio_to_base": ratio,
         "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in rss.items()},
         "work_rss_mb": {k: v["work_mb"] for k, v in rss.items()}}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
