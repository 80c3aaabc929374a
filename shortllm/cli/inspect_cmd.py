"""`shortllm inspect MODEL [--json]`: what shortllm will work on — the decoder blocks, embeddings, final norm,
LM head (and the logit transforms it reproduces), each block's attention / MLP branches and their output
projections — and whether that came from the registry or from discovery (one traced forward)."""
from __future__ import annotations

import argparse
import json

from shortllm.cli.options import DTYPES, add_device_arg, add_dtype_arg, add_trust_remote_code_arg


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show the blocks, norm, head and branches shortllm finds in a model",
                       description="Load MODEL and print the architecture shortllm will prune: registry entry or "
                                   "discovered from the module tree and one traced forward.")
    p.add_argument("model", help="built-in name (smollm2-135m), local checkpoint dir or hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_trust_remote_code_arg(p)
    add_dtype_arg(p, default="float32")
    add_device_arg(p)
    p.set_defaults(func=run)


def describe(model) -> dict:
    """Everything `inspect` prints, as plain data."""
    from shortllm.model.adapters import REGISTRY, get_adapter
    from shortllm.model.discovery import BlockBranches, discover, expert_modules

    model_type = getattr(model.config, "model_type", "") or ""
    ad = get_adapter(model)
    spec = ad.spec
    if model_type in REGISTRY:
        source = "registry"
        per_block = [BlockBranches(attn=spec.attn if ad.attn(b) is not None else "",
                                   mlp=spec.mlp if ad.mlp(b) is not None else "",
                                   attn_out=spec.attn_out if ad.attn_out(b) is not None else "",
                                   mlp_out=spec.mlp_out if ad.mlp_out(b) is not None else "",
                                   block_class=type(b).__name__) for b in ad.blocks()]
    else:
        source = "discovered"
        per_block = discover(model).block_branches
    head = ad.head_params()
    return {
        "model_type": model_type, "class": type(model).__name__, "source": source,
        "blocks": {"path": spec.blocks, "count": ad.num_layers, "config_key": spec.num_layers_key,
                   "config_path": spec.config_path},
        "embeddings": list(spec.embeddings),
        "final_norm": spec.final_norm if ad.final_norm() is not None else None,
        "head": {"path": spec.lm_head, "extra": list(spec.head_extra), "softcap": head["softcap"],
                 "scale": head["scale"], "bias": head["bias"] is not None},
        "per_layer_config": list(spec.per_layer_config),
        "branches": [{"block": i, "class": b.block_class, "attn": b.attn or None, "attn_out": b.attn_out or None,
                      "mlp": b.mlp or None, "mlp_out": b.mlp_out or None,
                      "experts": [{"path": p, "count": n} for p, n in expert_modules(blk)]}
                     for i, (b, blk) in enumerate(zip(per_block, ad.blocks()))],
    }


def _text(d: dict) -> str:
    lines = [f"{d['class']} (model_type={d['model_type']!r}): {d['source']}",
             f"blocks      {d['blocks']['path']}  x{d['blocks']['count']}  (config."
             + (f"{d['blocks']['config_path']}." if d['blocks']['config_path'] else "")
             + f"{d['blocks']['config_key']})",
             f"embeddings  {', '.join(d['embeddings']) or '-'}",
             f"final norm  {d['final_norm'] or 'none'}",
             f"head        {d['head']['path']}"
             + (f" after {', '.join(d['head']['extra'])}" if d['head']['extra'] else "")
             + f"  softcap={d['head']['softcap']:g} scale={d['head']['scale']:g}"]
    if d["per_layer_config"]:
        lines.append(f"per-layer config  {', '.join(d['per_layer_config'])}")
    lines.append("block  class  attn (out)  mlp (out); '-' = none, branch removal refused there")
    for b in d["branches"]:
        lines.append(f"{b['block']:>5}  {b['class']}  {b['attn'] or '-'} ({b['attn_out'] or '-'})  "
                     f"{b['mlp'] or '-'} ({b['mlp_out'] or '-'})"
                     + "".join(f"  experts {e['path']} x{e['count']}" for e in b["experts"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from shortllm.model.loading import load_model

    # trust_remote_code defaults to False in transformers too; passed explicitly so a checkpoint's own code
    # runs only when asked for
    model, _ = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device,
                          trust_remote_code=bool(args.trust_remote_code))
    d = describe(model)
    print(json.dumps(d, indent=2) if args.json else _text(d))
    return 0
