"""`shortllm search MODEL --method iterative|subblock --remove K -o plan.json`: SLEB / BlockPruner greedy PPL
search. The output is a plan file (the one format `shortllm prune --plan` reads), with the search record
in its `scores_meta["search"]`."""
from __future__ import annotations

import argparse

from shortllm.cli.options import (
    DTYPES,
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    check_output_file,
    load_data,
)


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="greedy PPL search: SLEB (whole blocks) or BlockPruner (attn/MLP)",
                       description="Greedy perplexity search; writes a plan that `shortllm prune --plan` applies.")
    p.add_argument("model", help="built-in name (smollm2-135m), local checkpoint dir or hub id")
    p.add_argument("--method", choices=("iterative", "subblock"), default="iterative")
    p.add_argument("--remove", type=int, required=True, help="blocks (iterative) or branches (subblock) to remove")
    add_data_args(p)
    p.add_argument("--protect-first", type=int, default=0, help="never remove the first k blocks")
    p.add_argument("--protect-last", type=int, default=0, help="never remove the last m blocks")
    p.add_argument("--head", choices=("auto", "op", "torch"), default="auto",
                   help="LM-head loss: the fused chunked op, row-chunked F.cross_entropy, or auto (op on CUDA)")
    add_dtype_arg(p, default="float32")
    add_device_arg(p)
    p.add_argument("-o", "--output", required=True, help="where to write the plan JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shortllm.model.loading import load_model, model_id
    from shortllm.scoring.search import candidate_label, iterative, subblock, to_plan

    out = check_output_file(args.output)
    model, tok = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    data = load_data(args, tok)
    fn = iterative if args.method == "iterative" else subblock
    res = fn(model, data, args.remove, protect=(args.protect_first, args.protect_last), progress=not args.quiet,
             head=args.head)
    res.meta.update({"model": model_id(model), "data": getattr(data, "description", None),
                     "data_fingerprint": getattr(data, "fingerprint", None)})
    plan = to_plan(res, model)
    plan.save(out)
    print(f"{args.method}: removed {[candidate_label(c) for c in res.plan]}; PPL {res.base_ppl:.3f} -> "
          f"{res.ppl_after_each_step[-1]:.3f}; wrote the plan to {out} (`shortllm prune MODEL --plan {out}`)")
    return 0
