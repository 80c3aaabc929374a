"""`shortllm score MODEL --metrics bi,angular,taylor,mag,ppl -o scores.json` (in memory, distributed, or
out-of-core with `--offload disk`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from shortllm.cli.options import (
    DTYPES,
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_trust_remote_code_arg,
    check_output_file,
    load_data,
    reject_unused,
    resolve_device,
    write_scores,
)
from shortllm.errors import ModelLoadError


def add_parser(sub) -> None:
    sc = sub.add_parser("score", help="score every decoder block (one streaming pass)")
    sc.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m), a local checkpoint dir, a .gguf "
                                  "file (dequantised by transformers' GGUF loader), or a hub id")
    add_data_args(sc)
    sc.add_argument("--metrics", default="bi,angular,taylor,mag",
                    help="comma list of bi,angular,taylor,mag,ppl,bi_attn,bi_mlp,gate,tail")
    sc.add_argument("--n-max", type=int, default=None, help="largest angular span (default min(8, L-1))")
    sc.add_argument("--angular-tokens", choices=("all", "last"), default="all")
    sc.add_argument("--taylor-mode", choices=("exact", "streaming"), default="exact")
    sc.add_argument("--gradient-checkpointing", action="store_true")
    add_dtype_arg(sc, default="float32")
    add_device_arg(sc)
    sc.add_argument("--offload", choices=("none", "disk"), default="none",
                    help="disk: block-major out-of-core scoring straight from the safetensors checkpoint")
    g = sc.add_argument_group("out-of-core scoring (only with --offload disk)")
    g.add_argument("--spill", choices=("auto", "memory", "disk"), default=None,
                   help="where PPL-candidate and Taylor states live (default auto: disk when over half the free RAM)")
    g.add_argument("--spill-dir", default=None, help="directory for spilled states (default: the system temp dir)")
    g.add_argument("--attn-implementation", default=None, help="eager | sdpa (default: transformers' default)")
    sc.add_argument("--distributed", action="store_true",
                    help="data-parallel over torch.distributed; launch with "
                         "`torchrun --nproc_per_node=N -m shortllm.cli score ... --distributed`")
    r = sc.add_argument_group("resumable scoring (in memory only)")
    r.add_argument("--checkpoint", default=None, help="directory for resumable scoring state")
    r.add_argument("--every", type=int, default=None, help="write the resumable state every K batches (default 10)")
    sc.add_argument("-q", "--quiet", action="store_true")
    add_trust_remote_code_arg(sc)
    sc.add_argument("-o", "--output", default="scores.json")
    sc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from shortllm.scoring.engine import DEFAULT_CHECKPOINT_EVERY, parse_metrics, score_fast

    parse_metrics(args.metrics)  # a typo fails in a second, before the model is loaded or converted
    out = check_output_file(args.output)
    if args.offload == "disk":
        reject_unused(args, "with --offload disk (out-of-core scoring is not resumable, nor distributed)",
                      {"--checkpoint": None, "--every": None, "--gradient-checkpointing": False,
                       "--distributed": False})
    else:
        reject_unused(args, "without --offload disk", {"--spill": None, "--spill-dir": None,
                                                       "--attn-implementation": None})
        if args.checkpoint is None:
            reject_unused(args, "without --checkpoint", {"--every": None})
    device = resolve_device(args.device, args.distributed)
    if args.distributed:
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")
    if args.offload == "disk":
        scores = _score_offload(args, device)
    else:
        from shortllm.model.loading import load_model

        model, tok = load_model(args.model, dtype=DTYPES[args.dtype], device=device,
                                trust_remote_code=args.trust_remote_code)
        every = args.every if args.every is not None else DEFAULT_CHECKPOINT_EVERY
        scores = score_fast(model, load_data(args, tok), metrics=args.metrics, n_max=args.n_max,
                            angular_tokens=args.angular_tokens, taylor_mode=args.taylor_mode,
                            gradient_checkpointing=args.gradient_checkpointing, progress=not args.quiet,
                            model_name=args.model, checkpoint=args.checkpoint, every=every)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        paths = write_scores(scores, out)
        print(f"wrote {', '.join(str(p) for p in paths)}")
        for m in scores.metrics:
            print(f"{m:>8} ranking (least important first): {scores.ranking(m)}")
    return 0


def _score_offload(args: argparse.Namespace, device: str):
    """`score_checkpoint` on a local safetensors checkpoint (a built-in name means its cached checkpoint)."""
    from transformers import AutoTokenizer

    from shortllm.model.loading import BUILTIN_MODELS, builtin_checkpoint
    from shortllm.scoring.offload import score_checkpoint

    ckpt = Path(args.model).expanduser()
    if not ckpt.is_dir():
        if args.model.lower() not in BUILTIN_MODELS:
            raise ModelLoadError(f"--offload disk needs a local safetensors checkpoint dir; {args.model} is "
                                 "not one (download it first, or use a built-in name)")
        ckpt = builtin_checkpoint(args.model.lower())
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no tokenizer in {ckpt} ({exc}); save the tokenizer beside the weights "
                             "(tokenizer.save_pretrained(dir))") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return score_checkpoint(
        ckpt, load_data(args, tok), metrics=args.metrics, n_max=args.n_max, angular_tokens=args.angular_tokens,
        taylor_mode=args.taylor_mode, dtype=DTYPES[args.dtype], device=device,
        attn_implementation=args.attn_implementation, spill=args.spill or "auto", spill_dir=args.spill_dir,
        progress=not args.quiet, model_name=str(args.model))
