"""Pruning x quantization (the ShortGPT claim that layer removal is orthogonal to quantization), measured by
llama.cpp on GGUF files, for both built-in models.

    SHORTLLM_DATA=../shared/data python benchmarks/bench_gguf_quant.py [--chunks 16]

Rows: unpruned, 20% and 35% of the blocks removed (BI scored on 8 x 128 WikiText-2 train calibration
tokens; Gemma-3 plans restricted to those GGUF can express: make_gguf_plan). Columns: the built-in's weights
dequantized to f32 (export format="gguf", quant="f32"), the same requantized to Q8_0 (quant="q8_0"), and the
original file's own quantization (Q4_1 / Q4_K_M) pruned byte for byte (prune_gguf_file). Every cell is the
WikiText-2 test perplexity computed by llama.cpp (xllamacpp, CPU, one thread) on the same fixed slice: the
first N non-overlapping 128-token chunks, BOS prepended to every chunk for Gemma-3 (it needs BOS at every
sequence start), none for SmolLM2 (its tokenizer adds none).

Whether the degradations add up: with r_prune = ppl(pruned, f32)/ppl(unpruned, f32), r_quant =
ppl(unpruned, q)/ppl(unpruned, f32) and r_joint = ppl(pruned, q)/ppl(unpruned, f32), the interaction
r_joint / (r_prune * r_quant) is 1 when the two log-perplexity increases add (independent effects).

Writes benchmarks/results/gguf_quant.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import load_average, stamp, stamp_dict, write_report  # noqa: E402

MODELS = {"smollm2-135m": {"bos": False, "quant": "Q4_1"}, "gemma3-270m": {"bos": True, "quant": "Q4_K_M"}}
LEVELS = (0.0, 0.2, 0.35)
COLUMNS = ("f32", "q8_0", "orig")


def run_model(name: str, chunks_n: int, seq_len: int, work: Path, log) -> dict:
    from shortllm.data.calibration import calibration_loader
    from shortllm.model.loading import builtin_gguf, load_model
    from shortllm.pruning.exporting import export
    from shortllm.pruning.gguf_plans import make_gguf_plan, prune_gguf_file
    from shortllm.pruning.removal import prune
    from shortllm.scoring.engine import score_fast
    from shortllm.testing.llamacpp import LlamaCpp, wikitext2_chunks

    spec = MODELS[name]
    model, tok = load_model(name)
    src = builtin_gguf(name)
    chunks = wikitext2_chunks(tok, chunks_n, seq_len, bos=spec["bos"])
    calib = calibration_loader("wikitext2", tok, n_samples=8, seq_len=128, seed=0, add_bos=spec["bos"])
    scores = score_fast(model, calib, metrics=("bi",), progress=False, model_name=name)
    L = model.config.num_hidden_layers
    out = {"blocks": L, "bos_every_chunk": spec["bos"], "orig_quant": spec["quant"], "calibration": calib.description,
           "bi": [float(v) for v in scores.per_block("bi").tolist()], "cells": {}}
    for level in LEVELS:
        k = int(round(level * L))
        key = f"{int(level * 100)}%"
        files = {}
        if k == 0:
            plan = None
            m = model
            files["orig"] = src
        else:
            plan = make_gguf_plan(scores, "bi", model=model, remove=k)
            files["orig"] = prune_gguf_file(src, plan, work / f"{name}-{key}-orig.gguf")
            m, _ = load_model(name)
            prune(m, plan)
        for q in ("f32", "q8_0"):
            files[q] = export(m, work / f"{name}-{key}-{q}.gguf", format="gguf", quant=q, tokenizer_from=src,
                              plan=plan)
        row = {"removed": plan.removed if plan else [], "params_after": plan.params_after if plan else None,
               "plan_mode": plan.mode if plan else None}
        for q in COLUMNS:
            t0 = time.perf_counter()
            with LlamaCpp(files[q], n_ctx=seq_len + 8, threads=1) as lc:
                ppl, mask = lc.perplexity(chunks, progress=True)
            row[q] = ppl
            row[f"{q}_tokens"] = sum(map(sum, mask))  # same in every cell: withheld tokens depend on the token
            row[f"{q}_seconds"] = round(time.perf_counter() - t0, 1)
            row[f"{q}_file_mb"] = round(Path(files[q]).stat().st_size / 2**20, 1)
            log(f"{name} {key} {q}: ppl {ppl:.3f} ({row[f'{q}_seconds']} s)")
            if Path(files[q]).parent == work:
                Path(files[q]).unlink()
        out["cells"][key] = row
    base = out["cells"]["0%"]["f32"]
    for row in out["cells"].values():
        r_prune = row["f32"] / base
        for q in ("q8_0", "orig"):
            r_quant = out["cells"]["0%"][q] / base
            r_joint = row[q] / base
            row[f"{q}_interaction"] = r_joint / (r_prune * r_quant)
    out["predicted_tokens"] = sum(len(c) - 1 for c in chunks)
    out["scored_tokens"] = out["cells"]["0%"]["f32_tokens"]
    return out


def markdown(res: dict) -> str:
    lines = ["## gguf_quant", "",
             "Pruning x quantization on GGUF, every perplexity computed by llama.cpp (xllamacpp "
             f"{res['xllamacpp']}, CPU, 1 thread) on WikiText-2 test, the first {res['chunks']} x {res['seq_len']}-"
             "token chunks (BOS prepended to every chunk for Gemma-3, none for SmolLM2). Blocks removed by BI "
             "(8 x 128 WikiText-2 calibration tokens), 20% / 35% of the blocks; Gemma-3 plans restricted to "
             "those GGUF can express (the fixed sliding/global period). f32 = the built-in's weights dequantized "
             "(shortllm export quant=f32), Q8_0 = those requantized (quant=q8_0), orig = the original file's "
             "quantization, pruned byte for byte. interaction = r_joint / (r_prune x r_quant); 1 = the "
             "log-perplexity increases add up.", "",
             "Tokens llama.cpp's server reports no log-probability for (a byte that is not complete UTF-8 on "
             "its own) are left out of every cell alike; the scored-token count is given per model.", "",
             f"Measured {res['stamp']}; {res['load']}.", ""]
    for name, m in res["models"].items():
        oq = m["orig_quant"]
        when = f"; measured {m['measured']}" if m.get("measured") else ""
        lines += [f"### {name} ({m['blocks']} blocks; {m['scored_tokens']} of {m['predicted_tokens']} predicted "
                  f"tokens scored{when})", "",
                  f"| removed | blocks | f32 | Q8_0 | {oq} (orig) | r_prune | Q8_0 interaction | {oq} interaction |",
                  "|---|---|---|---|---|---|---|---|"]
        base = m["cells"]["0%"]["f32"]
        for key, row in m["cells"].items():
            lines.append(f"| {key} | {row['removed']} | {row['f32']:.2f} | {row['q8_0']:.2f} | {row['orig']:.2f} | "
                         f"{row['f32'] / base:.3f} | {row['q8_0_interaction']:.3f} | {row['orig_interaction']:.3f} |")
        lines.append("")
    lines += ["Reading: r_quant is the unpruned row's column / its f32 cell; an interaction above 1 means "
              "quantization hurts the pruned model more than the unpruned one (the effects compound), below 1 "
              "less. Caveats: a short slice (the perplexities carry a few percent of sampling noise, the "
              "interactions less, since every cell uses the same tokens); Gemma-3's calibration batches start "
              "with BOS, yet BI removes the global (full-attention) block 17 at 20% and block 11 at 35%: "
              "without retraining BI is a poor criterion for this model (perplexity x84 and x166), whatever "
              "the quantization; 'f32' is the dequantized Q4 model, not the original bf16 release. Script: "
              "`benchmarks/bench_gguf_quant.py` (`--markdown-only` rewrites this file from the JSON).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--keep-others", action="store_true", help="keep the rows of models not in --models")
    args = ap.parse_args()
    if args.markdown_only:
        write_report(HERE / "results" / "gguf_quant.md",
                     markdown(json.loads((HERE / "results" / "gguf_quant.json").read_text())))
        return
    torch.set_num_threads(1)
    import xllamacpp

    res = {"stamp": stamp(), "machine": stamp_dict(), "load": load_average(), "chunks": args.chunks,
           "seq_len": args.seq_len, "xllamacpp": xllamacpp.__version__, "models": {}}
    t0 = time.perf_counter()
    start_load = res["load"]
    old = HERE / "results" / "gguf_quant.json"
    if args.keep_others and old.is_file():  # rerun some models, keep the others' rows (with their own stamp)
        prev = json.loads(old.read_text())
        for name, m in prev["models"].items():
            if name not in args.models.split(","):
                res["models"][name] = {**m, "measured": m.get("measured", prev["stamp"])}
    out = HERE / "results"
    with tempfile.TemporaryDirectory(prefix="gguf_quant_") as d:
        for name in args.models.split(","):
            res["models"][name] = run_model(name, args.chunks, args.seq_len, Path(d), lambda s: print(s, flush=True))
            # written after each model, so a long run keeps what it has finished
            res["seconds"] = round(time.perf_counter() - t0, 1)
            res["load"] = f"{start_load} at start; {load_average()} at the end; {res['seconds']} s in all"
            write_report(out / "gguf_quant.json", json.dumps(res, indent=1))
            write_report(out / "gguf_quant.md", markdown(res))


if __name__ == "__main__":
    main()
