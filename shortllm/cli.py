"""`shortllm` command line. Every ShortLLMError becomes one line on stderr and exit code 2
(a traceback only with --debug)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import ModelLoadError, ShortLLMError

# stage modules that contribute subcommands through `register_cli(subparsers)`
_CLI_MODULES = ("shortllm.search", "shortllm.prune", "shortllm.eval_cli", "shortllm.retrain")


def add_data_args(p: argparse.ArgumentParser, samples: int = 10, seq_len: int = 128) -> None:
    p.add_argument("--data", default="wikitext2", help="corpus name (wikitext2, ptb, c4) or a text file")
    p.add_argument("--split", default=None, help="corpus split (default: wikitext2 validation, ptb train)")
    p.add_argument("--samples", type=int, default=samples, help="number of calibration sequences")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("random", "contiguous"), default="random")


def load_data(args, tokenizer):
    from .data import calibration_loader

    return calibration_loader(args.data, tokenizer, n_samples=args.samples, seq_len=args.seq_len,
                              batch_size=args.batch_size, seed=args.seed, mode=args.mode, split=args.split)


def write_scores(scores, out: Path) -> list[Path]:
    """scores.json + scores.md + scores.png side by side (each written atomically)."""
    from .scores import atomic_write_text

    out = Path(out)
    scores.save(out)
    md = out.with_suffix(".md")
    atomic_write_text(md, f"# Block scores: {scores.meta.get('model_name')}\n\n"
                          f"Data: `{json.dumps(scores.meta.get('data'))}`, {scores.meta.get('n_tokens')} tokens.\n\n"
                          + scores.to_markdown())
    png = scores.plot(out.with_suffix(".png"))
    return [out, md, png]


def _score(args) -> int:
    from .engine import parse_metrics, score_fast
    from .models import load_model

    parse_metrics(args.metrics)  # a typo fails in a second, before the model is loaded or converted
    if args.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo" if args.device == "cpu" else "nccl")
    if args.offload == "disk":
        from .models import BUILTIN_MODELS, builtin_checkpoint
        from .offload import run_offload_from_args

        if not Path(args.model).expanduser().is_dir():
            if args.model.lower() not in BUILTIN_MODELS:
                raise ModelLoadError(f"--offload disk needs a local safetensors checkpoint dir; {args.model} is "
                                     "not one (download it first, or use a built-in name)")
            args.model = str(builtin_checkpoint(args.model.lower()))
        scores = run_offload_from_args(args)
    else:
        model, tok = load_model(args.model, device=args.device)
        extra = {}
        if args.checkpoint:
            extra.update(checkpoint=args.checkpoint, every=args.every)
        scores = score_fast(model, load_data(args, tok), metrics=args.metrics, n_max=args.n_max,
                            angular_tokens=args.angular_tokens, taylor_mode=args.taylor_mode,
                            gradient_checkpointing=args.gradient_checkpointing, progress=not args.quiet,
                            model_name=args.model, **extra)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        paths = write_scores(scores, Path(args.output))
        print(f"wrote {', '.join(str(p) for p in paths)}")
        for m in scores.metrics:
            print(f"{m:>8} ranking (least important first): {scores.ranking(m)}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.output), samples=args.samples, seq_len=args.seq_len, ratio=args.ratio,
             progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortllm", description="Depth pruning for Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    sc = sub.add_parser("score", help="score every decoder block (one streaming pass)")
    sc.add_argument("model", help="built-in name (smollm2-135m), a local checkpoint dir, or a hub id")
    add_data_args(sc)
    sc.add_argument("--metrics", default="bi,angular,taylor,mag", help="comma list of bi,angular,taylor,mag,ppl")
    sc.add_argument("--n-max", type=int, default=None, help="largest angular span (default min(8, L-1))")
    sc.add_argument("--angular-tokens", choices=("all", "last"), default="all")
    sc.add_argument("--taylor-mode", choices=("exact", "streaming"), default="exact")
    sc.add_argument("--gradient-checkpointing", action="store_true")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--offload", choices=("none", "disk"), default="none",
                    help="disk: block-major out-of-core scoring straight from the safetensors checkpoint")
    from .offload import add_offload_args

    add_offload_args(sc)
    sc.add_argument("--distributed", action="store_true",
                    help="data-parallel over torch.distributed; launch with "
                         "`torchrun --nproc_per_node=N -m shortllm.cli score ... --distributed`")
    sc.add_argument("--checkpoint", default=None, help="directory for resumable scoring state")
    sc.add_argument("--every", type=int, default=1, help="write the resumable state every K batches")
    sc.add_argument("-q", "--quiet", action="store_true")
    sc.add_argument("-o", "--output", default="scores.json")
    sc.set_defaults(func=_score)

    de = sub.add_parser("demo", help="score the built-in SmolLM2-135M on WikiText-2, prune 20%%, export, generate")
    de.add_argument("-o", "--output", default="demo_out")
    de.add_argument("--samples", type=int, default=10)
    de.add_argument("--seq-len", type=int, default=128)
    de.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters to remove")
    de.add_argument("-q", "--quiet", action="store_true")
    de.set_defaults(func=_demo)

    for name in _CLI_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) or getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except ShortLLMError as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split())
        print(f"shortllm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shortllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
