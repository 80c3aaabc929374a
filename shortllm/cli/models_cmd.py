"""`shortllm models`: the built-in models, and whether each is already converted in the cache."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the built-in models (name, family, blocks, cached or not)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shortllm.model.loading import builtin_info

    rows = builtin_info()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<14} {'family':<8} {'blocks':>6}  {'cached':<6} {'gguf':<4}  description")
    for r in rows:
        print(f"{r['name']:<14} {r['family']:<8} {r['blocks']:>6}  {'yes' if r['cached'] else 'no':<6} "
              f"{'yes' if r['gguf_cached'] else 'no':<4}  {r['description']}")
    return 0
