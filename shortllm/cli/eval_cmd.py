"""`shortllm eval MODEL|DIR --ppl wikitext2,ptb --tasks boolq,piqa,...,mmlu [--num-fewshot 5] [--limit N] -o eval.json`.

Perplexity is built in (LLM-Pruner 128-token and GPTQ 2048-token protocols; BOS by the tokenizer's policy
unless --bos says otherwise); tasks run through lm-eval-harness (`shortllm.evaluation.harness`) on the
local files under $SHORTLLM_DATA (or lm-eval's registry for other names). Writes the JSON report and a
Markdown table next to it (same name, `.md`)."""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from shortllm.cli.options import DTYPES, add_device_arg, add_dtype_arg, check_output_file, split_list
from shortllm.data.tasks import DEFAULT_TASKS
from shortllm.errors import DataError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and benchmark accuracy (lm-eval-harness) of a model",
                       description="Perplexity (LLM-Pruner/Shortened-LLaMA or GPTQ protocol) and lm-eval-harness "
                                   "tasks (the 7 zero-shot tasks, lambada_openai, mmlu offline from $SHORTLLM_DATA; "
                                   "any registry task online). Writes JSON and a Markdown table (same name, .md).")
    p.add_argument("model", help="built-in name (smollm2-135m) or a local Hugging Face checkpoint dir")
    p.add_argument("--ppl", default="wikitext2,ptb", help="comma list of wikitext2,ptb,c4 (or 'none')")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma list of lm-eval task names (local: the 7 zero-shot tasks, lambada_openai, mmlu); "
                        "'all' = the 7 zero-shot tasks; 'none'")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (MMLU: the dev split's first N)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N documents of each task (MMLU: of each subject; default: all)")
    p.add_argument("--task-source", default="auto", choices=("auto", "local", "registry"),
                   help="auto: local YAMLs for the local tasks when $SHORTLLM_DATA is set, else lm-eval's registry")
    p.add_argument("--protocol", default="llm-pruner", help="llm-pruner and/or gptq (comma list)")
    p.add_argument("--seq-len", type=int, default=None, help="chunk length (default 128 llm-pruner, 2048 gptq)")
    p.add_argument("--bos", default="auto",
                   help="auto (the tokenizer's policy: BOS on every chunk iff it adds BOS), none, once and/or "
                        "every_chunk (comma list: each is run)")
    p.add_argument("--max-chunks", type=int, default=None, help="first N perplexity chunks only (quick runs)")
    p.add_argument("--batch-size", type=int, default=8)
    add_dtype_arg(p, default="float32")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars of shortllm's own (lm-eval draws its own and has no switch for them)")
    p.add_argument("-o", "--output", default="eval.json", help="JSON report path (the .md goes next to it)")
    p.set_defaults(func=run)


def _check_tasks(args: argparse.Namespace, tasks: list[str]) -> None:
    from shortllm.evaluation.harness import LOCAL_TASKS

    if args.task_source == "local":
        unknown = [t for t in tasks if t not in LOCAL_TASKS]
        if unknown:
            raise DataError(f"Unknown task(s) {unknown} for --task-source local; local tasks: "
                            f"{', '.join(LOCAL_TASKS)}.")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be a positive item count, got {args.limit}")


def run(args: argparse.Namespace) -> int:
    from shortllm.evaluation.corpus_ppl import perplexity
    from shortllm.evaluation.report import render_markdown
    from shortllm.io.atomic import atomic_write_text
    from shortllm.io.stamp import versions
    from shortllm.model.loading import load_model

    ppl_sets, tasks = split_list(args.ppl), [t.lower() for t in split_list(args.tasks)]
    if tasks == ["all"]:
        tasks = list(DEFAULT_TASKS)
    if tasks:
        _check_tasks(args, tasks)  # fail on a typo before loading the model
    elif args.num_fewshot or args.limit is not None:
        raise UsageError("--num-fewshot/--limit apply to --tasks only; drop them or give --tasks")
    if not ppl_sets and not tasks:
        raise DataError("Nothing to evaluate: give --ppl and/or --tasks.")
    if tasks:
        from shortllm.evaluation.harness import require_lm_eval
        require_lm_eval()
    out = check_output_file(args.output)
    model, tok = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    report = {"model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dtype": args.dtype, "device": args.device, "versions": versions(), "perplexity": [],
              "harness": None}
    t0 = time.perf_counter()
    for proto in split_list(args.protocol):
        for bos in split_list(args.bos, none_is_empty=False) or ["auto"]:
            for ds in ppl_sets:
                r = perplexity(model, tok, ds, seq_len=args.seq_len, protocol=proto, bos=bos,
                               batch_size=args.batch_size, max_chunks=args.max_chunks, progress=not args.no_progress)
                report["perplexity"].append(r.to_dict())
    if tasks:
        from shortllm.evaluation.harness import harness_eval

        report["harness"] = harness_eval(model, tok, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                         batch_size=args.batch_size, source=args.task_source).to_dict()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render_markdown(report))
    print(render_markdown(report))
    return 0
