"""`shortllm eval MODEL --ppl wikitext2,ptb --tasks boolq,piqa,... [--limit N] -o eval.json`.

Writes the JSON report and a Markdown table next to it (same name, ``.md``). The evaluators are
`shortllm.evaluate.perplexity` and `shortllm.evaluate.zeroshot`; `shortllm.evaluate` re-exports
`register_cli` and `render_markdown`.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ._io import atomic_write_text
from .errors import DataError
from .tasks import DEFAULT_TASKS, task_spec

__all__ = ["register_cli", "render_markdown"]


def _split_list(s: Optional[str], none_is_empty: bool = True) -> list[str]:
    items = [x.strip() for x in (s or "").split(",") if x.strip()]
    return [x for x in items if x.lower() != "none"] if none_is_empty else items


def _versions() -> dict:
    import platform

    import transformers

    from . import __version__ as ours
    return {"shortllm": ours, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def ppl_table(rows: list[dict]) -> list[str]:
    """Markdown lines of a perplexity table, one row per `PerplexityResult.to_dict()`."""
    lines = ["| dataset | split | protocol | seq_len | BOS | chunks | tokens | PPL | time (s) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["settings"]
        lines.append(f"| {s['dataset']} | {s.get('split', '-')} | {s['protocol']} | {s['seq_len']} | {s['bos']} | "
                     f"{s['n_chunks']} | {r['n_tokens']} | {r['ppl']:.3f} | {s['seconds']:.0f} |")
    return lines


def zeroshot_table(tasks: dict) -> list[str]:
    """Markdown lines of a zero-shot table (task name -> `TaskResult` dict) ending with the mean row."""
    lines = ["| task | n | acc | acc_norm | reported | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, t in tasks.items():
        lines.append(f"| {name} | {t['n']} | {100 * t['acc']:.2f} ± {100 * t['acc_stderr']:.2f} | "
                     f"{100 * t['acc_norm']:.2f} ± {100 * t['acc_norm_stderr']:.2f} | "
                     f"{100 * t['score']:.2f} ({t['metric']}) | {t['seconds']:.0f} |")
    mean = sum(t["score"] for t in tasks.values()) / len(tasks)
    return lines + [f"| **mean of {len(tasks)}** | | | | **{100 * mean:.2f}** | |"]


def render_markdown(report: dict) -> str:
    """The Markdown table of an eval report (the JSON written by ``shortllm eval``)."""
    versions = " · ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [f"# Evaluation of `{report['model']}`", "", f"{report['date']} · dtype {report['dtype']} · {versions}", ""]
    if report.get("perplexity"):
        lines += ppl_table(report["perplexity"]) + [""]
    zs = report.get("zeroshot")
    if zs:
        lim = zs["settings"].get("limit")
        lines += zeroshot_table(zs["tasks"]) + [
            "", f"Zero-shot: lm-eval-harness 0.4 semantics, "
                f"{'first ' + str(lim) + ' items per task' if lim else 'full splits'}."]
    return "\n".join(lines) + "\n"


def _run_eval(args) -> int:
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    from .evaluate import perplexity, zeroshot
    from .models import load_model
    dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}[args.dtype]
    ppl_sets, tasks = _split_list(args.ppl), _split_list(args.tasks)
    if tasks == ["all"]:
        tasks = list(DEFAULT_TASKS)
    for t in tasks:
        task_spec(t)  # fail on a typo before loading the model
    if not ppl_sets and not tasks:
        raise DataError("Nothing to evaluate: give --ppl and/or --tasks.")
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    out = Path(args.output)
    report = {"model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dtype": args.dtype, "device": args.device, "versions": _versions(), "perplexity": [], "zeroshot": None}
    t0 = time.perf_counter()
    for proto in _split_list(args.protocol):
        for bos in _split_list(args.bos, none_is_empty=False) or ["none"]:
            for ds in ppl_sets:
                r = perplexity(model, tok, ds, seq_len=args.seq_len, protocol=proto, bos=bos,
                               batch_size=args.batch_size, max_chunks=args.max_chunks, progress=not args.no_progress)
                report["perplexity"].append(r.to_dict())
    if tasks:
        report["zeroshot"] = zeroshot(model, tok, tasks, limit=args.limit, batch_size=args.batch_size,
                                      progress=not args.no_progress).to_dict()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render_markdown(report))
    print(render_markdown(report))
    return 0


def register_cli(subparsers) -> None:
    """Add ``shortllm eval MODEL --ppl wikitext2,ptb --tasks boolq,piqa,... [--limit N] -o eval.json``."""
    p = subparsers.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
                              description="Perplexity (LLM-Pruner/Shortened-LLaMA or GPTQ protocol) and lm-eval-style "
                                          "zero-shot accuracy. Writes JSON and a Markdown table (same name, .md).")
    p.add_argument("model", help="built-in name (smollm2-135m) or a local Hugging Face checkpoint dir")
    p.add_argument("--ppl", default="wikitext2,ptb", help="comma list of wikitext2,ptb,c4 (or 'none')")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma list of tasks, 'all' or 'none'")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--protocol", default="llm-pruner", help="llm-pruner and/or gptq (comma list)")
    p.add_argument("--seq-len", type=int, default=None, help="chunk length (default 128 llm-pruner, 2048 gptq)")
    p.add_argument("--bos", default="none", help="none, once and/or every_chunk (comma list: each is run)")
    p.add_argument("--max-chunks", type=int, default=None, help="first N perplexity chunks only (quick runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", default="eval.json", help="JSON report path (the .md goes next to it)")
    p.set_defaults(func=_run_eval)
