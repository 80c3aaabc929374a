"""`shortllm retrain MODEL --method lora|cpt --data ptb|c4|PATH --steps N -o OUT [--resume]`.

Writes ``OUT/model`` (a stock transformers checkpoint, LoRA merged), ``OUT/retrain.json`` (the
`RetrainResult` without the model) and ``OUT/checkpoints/``. Re-running with ``--resume`` continues a
killed run from its newest checkpoint (bit-identical to an uninterrupted run).
"""
from __future__ import annotations

import argparse
import json

from shortllm.cli.options import add_device_arg, check_output_dir
from shortllm.io.atomic import atomic_write_text


def add_parser(sub) -> None:
    p = sub.add_parser(
        "retrain", help="recover a pruned model with LoRA or continued pretraining (CPT)",
        description="Retrain MODEL (built-in name or local checkpoint dir) and write OUT/model (a stock "
                    "transformers checkpoint, LoRA merged), OUT/retrain.json and OUT/checkpoints/.")
    p.add_argument("model", help="built-in name (smollm2-135m) or a local Hugging Face checkpoint dir")
    p.add_argument("--method", choices=("lora", "cpt"), default="lora")
    p.add_argument("--data", required=True,
                   help="corpus name (ptb, c4, wikitext2), instruction .jsonl(.gz), text file, or folder of .txt")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("-o", "--output", required=True, help="run folder (must be new unless --resume)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-4 LoRA, 5e-5 CPT)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out PPL every N steps (0: before/after only)")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default=None, help="comma-separated leaf names (default: every projection)")
    p.add_argument("--data-dir", default=None, help="data folder (default $SHORTLLM_DATA)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shortllm.model.loading import load_model
    from shortllm.retrain.config import RetrainConfig
    from shortllm.retrain.train_data import load_retrain_data
    from shortllm.retrain.training import prepare_out_dir, retrain_model, save_retrained

    cfg = RetrainConfig(
        method=args.method, steps=args.steps, lr=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
        micro_batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        dtype="bf16" if args.bf16 else "fp32", gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        save_every=args.save_every, eval_every=args.eval_every, heldout_fraction=args.heldout_fraction,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target_modules=([t.strip() for t in args.lora_targets.split(",") if t.strip()]
                             if args.lora_targets else None),
    ).validate()
    out = check_output_dir(args.output, overwrite=True)  # writable at all? (prepare_out_dir: new unless --resume)
    prepare_out_dir(out, args.resume)  # fail before the slow model load
    model, tok = load_model(args.model, device=args.device)
    data = load_retrain_data(args.data, tok, cfg.seq_len, cfg.heldout_fraction, args.data_dir)
    result = retrain_model(model, tok, data, cfg, out_dir=out, resume=True, progress=not args.no_progress)
    save_retrained(result.model, tok, out / "model", overwrite=True)
    report = {**result.to_dict(), "model_in": str(args.model), "data": data.source, "model_out": str(out / "model")}
    atomic_write_text(out / "retrain.json", json.dumps(report, indent=1))
    after = f"{result.ppl_after:.3f}" if result.ppl_after is not None else "n/a"
    before = f"{result.ppl_before:.3f}" if result.ppl_before is not None else "n/a"
    print(f"retrain[{cfg.method}]: {result.steps_done} steps, {result.tokens_seen} tokens, held-out PPL "
          f"{before} -> {after}; model in {out / 'model'}")
    return 0
