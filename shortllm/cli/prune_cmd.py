"""`shortllm prune MODEL (--scores S --metric M --ratio r | --remove K | --blocks 3,5 | --plan P) -o OUT`,
or `--target-params 100M | --target-memory 0.3GB | --target-latency 25ms` (combinable) with --scores/--metric;
`--heal lstsq|cosine|channel` fits and merges a seam map per removed span on calibration data first."""
from __future__ import annotations

import argparse
import re

from shortllm.cli.options import (
    DTYPES,
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_trust_remote_code_arg,
    check_output_dir,
    check_output_file,
    load_data,
    reject_unused,
)
from shortllm.errors import UsageError

HEAL_METHODS = ("lstsq", "cosine", "channel")
_UNITS = {
    "params": ({"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}, "a count such as 100M, 1.5B, 500K or 135000000"),
    "memory": ({"gb": 1.0, "mb": 1e-3, "kb": 1e-6, "gib": 2**30 / 1e9, "mib": 2**20 / 1e9, "b": 1e-9},
               "bytes of parameters such as 0.3GB, 300MB, 0.25GiB or 512MiB"),
    "latency": ({"ms": 1.0, "s": 1e3, "us": 1e-3}, "a time such as 25ms, 0.5s or 800us"),
}


def parse_target(kind: str, text: str) -> float:
    """'100M' -> 1e8 params, '0.3GB' -> 0.3 (GB), '25ms' -> 25.0 (ms); UsageError naming the accepted forms."""
    units, forms = _UNITS[kind]
    flag = f"--target-{kind}"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
    if m is None or m.group(2).lower() not in units:
        raise UsageError(f"{flag} {text!r} is not understood: give {forms} (units: "
                         f"{', '.join(u or '(none)' for u in units)})")
    value = float(m.group(1)) * units[m.group(2).lower()]
    if not value > 0:
        raise UsageError(f"{flag} {text!r} must be positive")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove blocks chosen by a score or a plan, export a loadable checkpoint",
                       description="Prune MODEL by a metric of a scores file (or by a plan file) and export it to "
                                   "-o DIR.")
    p.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m), local HF checkpoint dir, hub id, or a "
                                 ".gguf file (then -o is the pruned .gguf file)")
    p.add_argument("--scores", help="scores JSON from `shortllm score` (needed for --remove/--ratio)")
    p.add_argument("--metric", default=None,
                   help="bi | angular | taylor | mag | ppl | gate | tail, or bi_attn | bi_mlp (removes attention / MLP "
                        "branches) (lower = removed first)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, help="fraction of the parameters to remove, e.g. 0.2")
    g.add_argument("--remove", type=int, help="number of blocks to remove")
    g.add_argument("--blocks", help="explicit 0-based block list, e.g. 3,5,7")
    g.add_argument("--plan", help="a plan JSON (from `shortllm search -o`, `--plan-out`, or Plan.save)")
    p.add_argument("--target-params", help="budget: at most this many parameters, e.g. 100M (with --scores/--metric)")
    p.add_argument("--target-memory", help="budget: at most this much parameter memory, e.g. 0.3GB")
    p.add_argument("--target-latency", help="budget: at most this latency measured here, e.g. 25ms (of one forward "
                                            "of --batch-size x --seq-len tokens, or one decode step: --latency-phase)")
    p.add_argument("--latency-phase", choices=("prefill", "decode"), default=None,
                   help="what --target-latency times (default prefill)")
    p.add_argument("--heal", choices=HEAL_METHODS, default=None,
                   help="fit a map per removed span on the calibration data (--data, --samples, ...) and merge it "
                        "into the block before the cut (training-free healing)")
    p.add_argument("--protect", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                   help="never remove the first/last blocks (default 4 2 for taylor/mag, else 0 0)")
    p.add_argument("--span", action="store_true", help="remove the contiguous span with the lowest angular distance")
    p.add_argument("--no-adjacent", action="store_true",
                   help="never remove two neighbouring blocks (with --remove/--ratio; checked with --blocks)")
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
    add_data_args(p)
    add_trust_remote_code_arg(p)
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
    if args.gguf_expressible and (args.span or args.no_adjacent or (args.ratio is None and args.remove is None)):
        raise UsageError("--gguf-expressible chooses among block plans: it applies with --ratio/--remove "
                         "(not --span, --blocks, --plan, --no-adjacent, --target-params, --target-memory or "
                         "--target-latency)")
    targets = [args.target_params, args.target_memory, args.target_latency]
    budget = _budget(args) if any(t is not None for t in targets) else None
    if budget is not None and any(v is not None for v in (args.ratio, args.remove, args.blocks, args.plan)):
        raise UsageError("--target-params/--target-memory/--target-latency choose what to remove: drop "
                         "--ratio/--remove/--blocks/--plan")
    if budget is None and all(v is None for v in (args.ratio, args.remove, args.blocks, args.plan)):
        raise UsageError("say what to remove: one of --ratio, --remove, --blocks or --plan, or a budget "
                         "(--target-params / --target-memory / --target-latency)")
    if budget is None and args.latency_phase is not None:
        raise UsageError("--latency-phase applies with --target-latency only; drop it")
    calib = {"--data": "wikitext2", "--split": None, "--samples": 10, "--seed": 0, "--mode": "random"}
    timing = {"--seq-len": 128, "--batch-size": 1}
    if args.heal is None:
        if budget is None or budget.latency_ms is None:
            reject_unused(args, "without --heal or --target-latency", {**calib, **timing})
        else:
            reject_unused(args, "without --heal (--target-latency uses only --batch-size and --seq-len)", calib)
    if budget is not None and (args.scores is None or args.metric is None):
        raise UsageError("--target-params/--target-memory/--target-latency pick blocks by score: give --scores FILE "
                         "and --metric NAME")
    if args.plan is not None:
        given = [f for f, v in (("--scores", args.scores), ("--metric", args.metric), ("--protect", args.protect),
                                ("--span", args.span or None), ("--no-adjacent", args.no_adjacent or None))
                 if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} do(es) not apply with --plan (the plan already says what to "
                             "remove); drop them")
    elif (args.ratio is not None or args.remove is not None) and (
            args.metric is None or (args.scores is None and args.metric != "tail")):
        raise UsageError("--ratio/--remove pick blocks by score: give --scores FILE and --metric NAME "
                         "(or --metric tail alone, --blocks 3,5,7, or --plan FILE)")
    check_output_dir(args.output, args.overwrite)
    for flag, path in (("--mergekit", args.mergekit), ("--plan-out", args.plan_out)):
        if path:
            check_output_file(path, flag)
    model, tok = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device,
                            trust_remote_code=args.trust_remote_code)
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
                             protect=args.protect, span=args.span, budget=budget, no_adjacent=args.no_adjacent)
    mergekit_text = mergekit_yaml(plan, args.model, config=model.config) if args.mergekit else None
    if args.heal is not None:
        from shortllm.pruning.healing import heal

        report = heal(model, plan, load_data(args, tok), method=args.heal)
        print(report.to_markdown(), end="")
    else:
        prune(model, plan)
    if budget is not None:
        from shortllm.pruning.budget import measured_figures

        plan.budget["measured"] = measured_figures(model, budget)
        for key, want in plan.budget["targets"].items():
            print(f"budget {key}: target {want:g}, predicted {plan.budget['predicted'][key]:g}, "
                  f"measured {plan.budget['measured'][key]:g}")
    out = export(model, args.output, tokenizer=tok, plan=plan, scores=scores, fused=args.fused,
                 overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    if mergekit_text is not None:
        atomic_write_text(args.mergekit, mergekit_text)
    if args.plan_out:
        plan.save(args.plan_out)
    if plan.removed_branches:
        print(f"removed branches {[f'{k}:{b}' for k, b in plan.removed_branches]}")
    print(f"removed blocks {plan.removed} of {plan.num_layers} ({plan.removed_fraction:.1%} of parameters: "
          f"{plan.params_before:,} -> {plan.params_after:,}); wrote {out}")
    return 0


def _budget(args: argparse.Namespace):
    from shortllm.pruning.budget import Budget

    params = None if args.target_params is None else int(round(parse_target("params", args.target_params)))
    memory = None if args.target_memory is None else parse_target("memory", args.target_memory)
    latency = None if args.target_latency is None else parse_target("latency", args.target_latency)
    return Budget(params=params, memory_gb=memory, latency_ms=latency, batch=args.batch_size, seq_len=args.seq_len,
                  phase=args.latency_phase or "prefill")


def _run_gguf(args: argparse.Namespace) -> int:
    """MODEL is a GGUF file: plan on the dequantised model (transformers' GGUF loader), then copy the file's
    remaining tensors byte for byte into the -o .gguf file (shortllm.io.gguf_files)."""
    from pathlib import Path

    from shortllm.model.loading import load_model
    from shortllm.pruning.gguf_plans import make_gguf_plan, prune_gguf_file
    from shortllm.pruning.plans import Plan, make_plan
    from shortllm.scoring.scores import Scores

    bad = [f for f, v in (("--fused", args.fused), ("--mergekit", args.mergekit), ("--span", args.span),
                          ("--no-adjacent", args.no_adjacent), ("--heal", args.heal),
                          ("--target-params", args.target_params), ("--target-memory", args.target_memory),
                          ("--target-latency", args.target_latency), ("--latency-phase", args.latency_phase))
           if v]
    if bad:
        raise UsageError(f"{', '.join(bad)} do(es) not apply to a GGUF MODEL (the output is a GGUF file of the "
                         "stock architecture); drop them")
    reject_unused(args, "for a GGUF MODEL (no calibration pass runs)",
                  {"--data": "wikitext2", "--split": None, "--samples": 10, "--seed": 0, "--mode": "random",
                   "--seq-len": 128, "--batch-size": 1})
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
