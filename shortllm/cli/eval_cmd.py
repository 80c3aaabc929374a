"""`shortllm eval MODEL --ppl wikitext2,ptb --tasks boolq,piqa,... [--limit N] -o eval.json`.

Writes the JSON report and a Markdown table next to it (same name, `.md`)."""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from shortllm.cli.options import DTYPES, add_device_arg, add_dtype_arg, check_output_file, split_list
from shortllm.data.tasks import DEFAULT_TASKS
from shortllm.errors import DataError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
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
    add_dtype_arg(p, default="float32")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", default="eval.json", help="JSON report path (the .md goes next to it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shortllm.data.tasks import task_spec
    from shortllm.evaluation.corpus_ppl import perplexity
    from shortllm.evaluation.report import render_markdown
    from shortllm.evaluation.zero_shot import zeroshot
    from shortllm.io.atomic import atomic_write_text
    from shortllm.io.stamp import versions
    from shortllm.model.loading import load_model

    ppl_sets, tasks = split_list(args.ppl), split_list(args.tasks)
    if tasks == ["all"]:
        tasks = list(DEFAULT_TASKS)
    for t in tasks:
        task_spec(t)  # fail on a typo before loading the model
    if not ppl_sets and not tasks:
        raise DataError("Nothing to evaluate: give --ppl and/or --tasks.")
    out = check_output_file(args.output)
    model, tok = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    report = {"model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dtype": args.dtype, "device": args.device, "versions": versions(), "perplexity": [],
              "zeroshot": None}
    t0 = time.perf_counter()
    for proto in split_list(args.protocol):
        for bos in split_list(args.bos, none_is_empty=False) or ["none"]:
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
