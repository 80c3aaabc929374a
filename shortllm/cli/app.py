"""`shortllm` command line. Every ShortLLMError becomes one line on stderr and exit code 2
(a traceback only with --debug)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from shortllm.cli import demo, eval_cmd, inspect_cmd, models_cmd, prune_cmd, retrain_cmd, score_cmd, search_cmd
from shortllm.errors import ShortLLMError

COMMANDS = (score_cmd, search_cmd, prune_cmd, eval_cmd, retrain_cmd, demo, inspect_cmd)
COMMANDS += (models_cmd,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortllm", description="Depth pruning for Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
