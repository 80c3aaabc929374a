"""`shortllm prune MODEL (--scores S --metric M --ratio r | --remove K | --blocks 3,5 | --plan P) -o OUT`."""
from __future__ import annotations

import argparse

from shortllm.cli.options import DTYPES, add_device_arg, add_dtype_arg, check_output_dir, check_output_file
from shortllm.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove blocks chosen by a score or a plan, export a loadable checkpoint",
                       description="Prune MODEL by a metric of a scores file (or by a plan file) and export it to "
                                   "-o DIR.")
    p.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m), local HF checkpoint dir, hub id, or a "
                                 ".gguf file (then -o is the pruned .gguf file)")
    p.add_argument("--scores", help="scores JSON from `shortllm score` (needed for --remove/--ratio)")
    p.add_argument("--metric", default=None, help="bi | angular | taylor | mag | ppl (lower = removed first)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of the parameters to remove, e.g. 0.2")
    g.add_argument("--remove", type=int, help="number of blocks to remove")
    g.add_argument("--blocks", help="explicit 0-based block list, e.g. 3,5,7")
    g.add_argument("--plan", help="a plan JSON (from `shortllm search -o`, `--plan-out`, or Plan.save)")
    p.add_argument("--protect", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                   help="never remove the first/last blocks (default 4 2 for taylor/mag, else 0 0)")
    p.add_argument("--span", action="store_true", help="remove the contiguous span with the lowest angular distance")
    add_dtype_arg(p, default="float32")
    add_device_arg(p)
    p.add_argument("-o", "--output", required=True,
                   help="output checkpoint dir (must not exist); a .gguf file for a GGUF MODEL")
    p.add_argument("--mergekit", help="also write a mergekit passthrough YAML of the plan here")
    p.add_argument("--plan-out", help="also write the plan JSON here")
    p.add_argument("--fused", action="store_true",
                   help="export the fused inference model (load with shortllm.load_fused)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--gguf-expressible", action="store_true",
                   help="with --ratio/--remove: only pick plans a GGUF file can express (Gemma-2/3: keep the "
                        "fixed sliding/global period); implied for a .gguf MODEL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shortllm.io.atomic import atomic_write_text
    from shortllm.model.loading import load_model
    from shortllm.pruning.exporting import export
    from shortllm.pruning.mergekit import mergekit_yaml
    from shortllm.pruning.plans import Plan, make_plan
    from shortllm.pruning.removal import prune
    from shortllm.scoring.scores import Scores

    if str(args.model).lower().endswith(".gguf"):
        return _run_gguf(args)
    if args.gguf_expressible and (args.span or (args.ratio is None and args.remove is None)):
        raise UsageError("--gguf-expressible chooses among block plans: it applies with --ratio/--remove "
                         "(not --span, --blocks or --plan)")
    if args.plan is not None:
        given = [f for f, v in (("--scores", args.scores), ("--metric", args.metric), ("--protect", args.protect),
                                ("--span", args.span or None)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} do(es) not apply with --plan (the plan already says what to "
                             "remove); drop them")
    elif (args.ratio is not None or args.remove is not None) and (args.scores is None or args.metric is None):
        raise UsageError("--ratio/--remove pick blocks by score: give --scores FILE and --metric NAME "
                         "(or --blocks 3,5,7, or --plan FILE)")
    check_output_dir(args.output, args.overwrite)
    for flag, path in (("--mergekit", args.mergekit), ("--plan-out", args.plan_out)):
        if path:
            check_output_file(path, flag)
    model, tok = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    scores = Scores.load(args.scores, model=model) if args.scores else None
    if args.plan is not None:
        plan = Plan.load(args.plan, model=model)
    else:
        blocks = [int(x) for x in args.blocks.split(",") if x.strip()] if args.blocks else None
        if args.gguf_expressible:
            from shortllm.pruning.gguf_plans import make_gguf_plan

            plan = make_gguf_plan(scores, args.metric, model=model, remove=args.remove, ratio=args.ratio,
                                  protect=args.protect)
        else:
            plan = make_plan(scores, args.metric, model=model, remove=args.remove, ratio=args.ratio, blocks=blocks,
                             protect=args.protect, span=args.span)
    mergekit_text = mergekit_yaml(plan, args.model, config=model.config) if args.mergekit else None
    prune(model, plan)
    out = export(model, args.output, tokenizer=tok, plan=plan, scores=scores, fused=args.fused,
                 overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    if mergekit_text is not None:
        atomic_write_text(args.mergekit, mergekit_text)
    if args.plan_out:
        plan.save(args.plan_out)
    print(f"removed blocks {plan.removed} of {plan.num_layers} ({plan.removed_fraction:.1%} of parameters: "
          f"{plan.params_before:,} -> {plan.params_after:,}); wrote {out}")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    """MODEL is a GGUF file: plan on the dequantised model (transformers' GGUF loader), then copy the file's
    remaining tensors byte for byte into the -o .gguf file (shortllm.io.gguf_files)."""
    from pathlib import Path

    from shortllm.model.loading import load_model
    from shortllm.pruning.gguf_plans import make_gguf_plan, prune_gguf_file
    from shortllm.pruning.plans import Plan, make_plan
    from shortllm.scoring.scores import Scores

    bad = [f for f, v in (("--fused", args.fused), ("--mergekit", args.mergekit), ("--span", args.span))
           if v]
    if bad:
        raise UsageError(f"{', '.join(bad)} do(es) not apply to a GGUF MODEL (the output is a GGUF file of the "
                         "stock architecture); drop them")
    if args.max_shard_size != "2GB":
        raise UsageError("--max-shard-size does not apply to a GGUF MODEL (one .gguf file is written); drop it")
    if not str(args.output).lower().endswith(".gguf"):
        raise UsageError(f"-o {args.output}: a GGUF MODEL is pruned into a GGUF file; give -o NAME.gguf")
    if args.plan is not None:
        given = [f for f, v in (("--scores", args.scores), ("--metric", args.metric), ("--protect", args.protect))
                 if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} do(es) not apply with --plan; drop them")
    elif (args.ratio is not None or args.remove is not None) and (args.scores is None or args.metric is None):
        raise UsageError("--ratio/--remove pick blocks by score: give --scores FILE and --metric NAME "
                         "(or --blocks 3,5,7, or --plan FILE)")
    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise UsageError(f"-o {out} already exists; choose another file or pass --overwrite")
    check_output_file(out)
    for flag, path in (("--plan-out", args.plan_out),):
        if path:
            check_output_file(path, flag)
    if args.plan is not None:
        plan = Plan.load(args.plan)
    else:
        model, _ = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
        scores = Scores.load(args.scores, model=model) if args.scores else None
        if args.blocks:
            plan = make_plan(scores, args.metric, model=model,
                             blocks=[int(x) for x in args.blocks.split(",") if x.strip()], protect=args.protect)
        else:
            plan = make_gguf_plan(scores, args.metric, model=model, remove=args.remove, ratio=args.ratio,
                                  protect=args.protect)
        del model
    path = prune_gguf_file(args.model, plan, out, overwrite=args.overwrite)
    if args.plan_out:
        plan.save(args.plan_out)
    print(f"removed blocks {plan.removed} of {plan.num_layers} ({plan.removed_fraction:.1%} of parameters); "
          f"wrote {path} (tensors copied byte for byte)")
    return 0
