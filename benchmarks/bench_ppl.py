"""PPL criterion end to end: prefix-reuse `ppl` metric vs the naive L full forwards; chunked LM-head CE memory.

    python benchmarks/bench_ppl.py --part smollm   # SmolLM2-135M, 10 x 128 WikiText-2 batches (writes JSON)
    python benchmarks/bench_ppl.py --part scaled   # 7B-shaped Llama scaled down in width (32 blocks)
    python benchmarks/bench_ppl.py --part memory   # chunked CE vs F.cross_entropy peak RSS (fresh subprocesses)
    python benchmarks/bench_ppl.py --report        # assemble benchmarks/results/ppl.md from the JSON parts

Times are process CPU seconds (and wall) with torch threads fixed (default 1): the machine is shared, and
CPU time of a single-threaded run is the least contention-sensitive measure. Each part writes its own JSON
so the parts can run in separate background processes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
sys.path.insert(0, str(HERE))

from _common import stamp  # noqa: E402


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.process_time() - c, time.perf_counter() - w


def _write(name: str, obj: dict) -> None:
    from shortllm.io.atomic import atomic_write_text

    atomic_write_text(OUT / f"ppl_{name}.json", json.dumps(obj, indent=1))


def _compare(model, data, label: str, heads=("torch", "op")) -> dict:
    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.ppl import removal_ppl_naive

    res = {"label": label}
    naive, c, w = _timed(lambda: removal_ppl_naive(model, data, float64=False))
    res["naive"] = {"cpu_s": c, "wall_s": w}
    for head in heads:
        s, c, w = _timed(lambda head=head: score_fast(model, data, metrics=("ppl",), progress=False, ppl_head=head))
        ppl = s.values["ppl"]
        res[f"ppl_{head}"] = {"cpu_s": c, "wall_s": w, "ratio_cpu": c / res["naive"]["cpu_s"],
                              "ratio_wall": w / res["naive"]["wall_s"],
                              "max_rel_diff": float(((ppl - naive).abs() / naive).max()),
                              "same_ranking": torch.argsort(ppl).tolist() == torch.argsort(naive).tolist()}
    res["ppl"] = naive.tolist()
    res["metric_ppl"] = ppl.tolist()
    return res


def part_smollm(args) -> None:
    from shortllm.data.calibration import calibration_loader
    from shortllm.model.loading import load_model
    from shortllm.scoring.ppl import mean_nll_full

    model, tok = load_model("smollm2-135m")
    data = calibration_loader("wikitext2", tok, n_samples=10, seq_len=128, batch_size=1, seed=0)
    res = _compare(model, data, "SmolLM2-135M, 10 x 128 WikiText-2 (validation, random windows, seed 0)",
                   heads=args.heads.split(","))
    res["base_ppl"] = math.exp(mean_nll_full(model, data))
    res["data"] = data.description
    _write("smollm", res)


def part_scaled(args) -> None:
    import transformers as tf

    # LLaMA-7B shape (32 blocks, I/D = 11008/4096, head = V*D ~ 0.65 of a block) at D = 256
    d, inter = 256, 688
    block = 4 * d * d + 3 * d * inter
    vocab = round(0.65 * block / d)
    cfg = tf.LlamaConfig(num_hidden_layers=32, hidden_size=d, intermediate_size=inter, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, vocab, (1, 128), generator=g),
             "attention_mask": torch.ones(1, 128, dtype=torch.long)} for _ in range(10)]
    res = _compare(model, data, f"Llama-7B shape scaled in width: 32 blocks, D={d}, I={inter}, V={vocab} "
                                f"(head/block params = {vocab * d / block:.2f}), 10 x 128 random tokens")
    res["label"] += f" (run {args.run})"
    _write("scaled" if args.run == 1 else f"scaled_{args.run}", res)


def _mem_child(variant: str) -> None:
    n, v, d = 4096, 49152, 576
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.02
    t = torch.randint(0, v, (n,), generator=g)
    from shortllm.ops import lm_head_nll

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if variant == "full":
            out = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none")
        else:
            out = lm_head_nll(h, w, t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "peak_delta_mb": (peak - base) / 1024, "sum": float(out.sum())}))


def part_memory(args) -> None:
    res = {"shape": "N=4096, V=49152, D=576, float32, forward (no grad)", "runs": {}}
    for variant in ("full", "chunked"):
        p = subprocess.run([sys.executable, __file__, "--mem-child", variant], capture_output=True, text=True,
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res["runs"][variant] = json.loads(p.stdout.strip().splitlines()[-1])
    r = res["runs"]
    res["ratio"] = r["chunked"]["peak_delta_mb"] / r["full"]["peak_delta_mb"]
    res["same_sum_rel"] = abs(r["chunked"]["sum"] - r["full"]["sum"]) / abs(r["full"]["sum"])
    _write("memory", res)


def report() -> None:
    import transformers

    parts = {p: json.loads((OUT / f"ppl_{p}.json").read_text())
             for p in ("smollm", "scaled", "scaled_2", "scaled_3", "memory") if (OUT / f"ppl_{p}.json").is_file()}
    lines = [f"# PPL criterion benchmarks ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs (shared with other "
             f"jobs: load average ~20 during the runs, {os.getloadavg()[0]:.1f} when this report was written), "
             f"torch {torch.__version__}, transformers "
             f"{transformers.__version__}, python {platform.python_version()}; stamp: {stamp()}. "
             "torch threads = 1; times are process CPU seconds (wall in parentheses). The ratios that count are the "
             "CPU ones: the load changed during the runs (the SmolLM2 naive pass ran under ~20 runnable processes, "
             "its ppl pass under ~9), so wall ratios are not comparable.", "",
             "`naive` = L full forwards, block i skipped through the layer list (config + layer_types rewritten), "
             "full [B, T, V] logits + F.cross_entropy. `ppl` = score_fast(metrics='ppl'): one forward walks the "
             "blocks, each block's suffix is replayed from its input with the captured calls; head `torch` = "
             "row-chunked F.linear + F.cross_entropy, head `op` = shortllm.ops.lm_head_nll (dispatched; CPU: _cpu "
             "extension).", ""]
    for key in ("smollm", "scaled", "scaled_2", "scaled_3"):
        if key not in parts:
            continue
        r = parts[key]
        lines += [f"## {r['label']}", "",
                  "| method | CPU s (wall s) | ratio vs naive (CPU / wall) | max rel diff vs naive | same ranking |",
                  "|---|---|---|---|---|",
                  f"| naive | {r['naive']['cpu_s']:.1f} ({r['naive']['wall_s']:.1f}) | 1 | - | - |"]
        for head in ("torch", "op"):
            if f"ppl_{head}" not in r:
                continue
            x = r[f"ppl_{head}"]
            lines.append(f"| ppl, head={head} | {x['cpu_s']:.1f} ({x['wall_s']:.1f}) | {x['ratio_cpu']:.3f} / "
                         f"{x['ratio_wall']:.3f} | {x['max_rel_diff']:.1e} | {x['same_ranking']} |")
        lines.append("")
    if "smollm" in parts:
        r = parts["smollm"]
        ppl = r["ppl"]
        order = sorted(range(len(ppl)), key=lambda i: ppl[i])
        lines += ["## SmolLM2-135M block-removal PPL ranking (WikiText-2, 10 x 128)", "",
                  f"Full model PPL on the same batches: {r['base_ppl']:.3f}. Least important first.", "",
                  "| rank | block removed | PPL (naive) | PPL (ppl metric) |", "|---|---|---|---|"]
        for k, i in enumerate(order):
            lines.append(f"| {k + 1} | {i} | {ppl[i]:.4f} | {r['metric_ppl'][i]:.4f} |")
        lines.append("")
    if "memory" in parts:
        m = parts["memory"]
        lines += ["## Chunked LM-head cross-entropy peak memory", "", f"{m['shape']}; peak RSS growth measured in a "
                  "fresh subprocess per variant (ru_maxrss after - before the call).", "",
                  "| variant | peak RSS delta (MB) |", "|---|---|"]
        for k, v in m["runs"].items():
            lines.append(f"| {'F.cross_entropy on full logits' if k == 'full' else 'lm_head_nll (chunked)'} | "
                         f"{v['peak_delta_mb']:.1f} |")
        lines += ["", f"Ratio chunked / full: **{m['ratio']:.3f}** (target <= 0.25); NLL sums agree to "
                  f"{m['same_sum_rel']:.1e} relative.", ""]
    lines += ["## Notes", "",
              "- Cost model per batch (block = 1 unit, head = h units): naive L(L-1) + L*h; prefix reuse "
              "L (the walk = the scorer's forward) + L(L-1)/2 (suffixes) + L*h + ~1 (capture pass: embeddings, "
              "masks, block 0). SmolLM2 (L=30, h~8): bound ~0.64; 7B shape (L=32, h=0.65): bound ~0.54. The "
              "7B-shape ratios sit at its bound: nothing beyond prefix reuse is claimed, and the head must be "
              "at least as fast as the naive's GEMM + log_softmax for the ratio to hold.",
              "- SmolLM2 lands below the ~0.64 bound because the two heads are not equal: from the measured "
              "totals (and a block at ~13.6 ms CPU, 1 thread, timed separately) the naive's per-forward head + "
              "overhead (full [1, 128, 49152] "
              "logits, F.cross_entropy over them, embeddings, masks) is ~0.13 s, the ppl metric's head ~0.10 s "
              "(only the 127 rows that have a target, in <= 64 MB chunks, no [B, T, V] tensor).",
              "- Head implementation: on CPU `lm_head_nll` (the _cpu extension: scalar expf online log-sum-exp, "
              "or the torch reference: logsumexp + gather) measured ~0.21-0.26 CPU s per 127 x 49,152 head vs "
              "~0.14 s for F.linear + F.cross_entropy and ~0.10 s for the GEMM alone (1 thread). The ppl metric "
              "runs one head per candidate, so `ppl_head='auto'` uses the row-chunked F.cross_entropy head on "
              "CPU (same definition incl. bias/scale/softcap, <= 64 MB logits per chunk) and the fused op on CUDA.",
              "- Noise: on the 7B shape the ppl variants differ only in a head that costs ~0.65 block (V=2007), yet "
              "their CPU-time ratios over two repeats spread from 0.505 to 0.563 (mean of the four: ~0.54, the "
              "bound): read every ratio here as +-0.03.", ""]
    from shortllm.io.atomic import atomic_write_text

    atomic_write_text(OUT / "ppl.md", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("smollm", "scaled", "memory"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", type=int, default=1, help="repeat number of the scaled part (kept side by side)")
    ap.add_argument("--heads", default="torch", help="ppl head implementations to time on SmolLM2 (torch,op)")
    ap.add_argument("--mem-child", choices=("full", "chunked"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mem_child:
        return _mem_child(args.mem_child)
    if args.part:
        {"smollm": part_smollm, "scaled": part_scaled, "memory": part_memory}[args.part](args)
    if args.report:
        report()


if __name__ == "__main__":
    main()
