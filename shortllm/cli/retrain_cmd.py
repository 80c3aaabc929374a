"""`shortllm retrain MODEL --method lora|cpt|kd|partial --data ptb|c4|PATH (--tokens N | --steps N) -o OUT`.

Runs transformers' Trainer (also under ``torchrun`` / ``accelerate launch``: every rank runs this
command, rank 0 writes). Writes ``OUT/model`` (a stock transformers checkpoint in safetensors, LoRA
merged), ``OUT/retrain.json`` (the `RetrainResult` without the model) and ``OUT/checkpoints/`` (the
Trainer's, with ``--save-every``); ``--resume`` continues from the newest checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortllm.cli.options import add_device_arg, check_output_dir, reject_unused, resolve_device
from shortllm.io.atomic import atomic_write_text


def add_parser(sub) -> None:
    p = sub.add_parser(
        "retrain", help="recover a pruned model: LoRA, continued pretraining, distillation or last-blocks tuning",
        description="Retrain MODEL (built-in name or local checkpoint dir) with transformers' Trainer and write "
                    "OUT/model (a stock transformers checkpoint, LoRA merged), OUT/retrain.json and "
                    "OUT/checkpoints/. Runs under torchrun / accelerate launch as well.")
    p.add_argument("model", help="built-in name (smollm2-135m) or a local Hugging Face checkpoint dir")
    p.add_argument("--method", choices=("lora", "cpt", "kd", "partial"), default="lora")
    p.add_argument("--data", required=True,
                   help="corpus name (ptb, c4, wikitext2), instruction .jsonl(.gz), text file, or folder of .txt")
    p.add_argument("--tokens", type=int, default=None,
                   help="token budget; steps = ceil(tokens / (batch x grad-accum x processes x seq-len))")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100 unless --tokens)")
    p.add_argument("-o", "--output", required=True, help="run folder (must be new unless --resume)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-4 LoRA, 5e-5 otherwise)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of the steps)")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="Trainer checkpoint every N steps (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="held-out PPL every N steps (0: before/after only)")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-targets", default=None, help="comma-separated leaf names (default: every projection)")
    p.add_argument("--teacher", default=None,
                   help="kd: teacher checkpoint dir or built-in name (default: the unpruned model recorded in "
                        "MODEL/shortllm.json)")
    p.add_argument("--kd-temperature", type=float, default=None, help="kd: softmax temperature (default 1)")
    p.add_argument("--kd-alpha", type=float, default=None,
                   help="kd: weight of the cross-entropy term, loss = (1-a) KD + a CE (default 0)")
    p.add_argument("--last-k", type=int, default=None, help="partial: blocks trained besides the head (default 2)")
    p.add_argument("--data-dir", default=None, help="data folder (default $SHORTLLM_DATA)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from shortllm.retrain.config import RetrainConfig

    return RetrainConfig(
        method=args.method, tokens=args.tokens, steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
        schedule=args.schedule, micro_batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        dtype="bf16" if args.bf16 else "fp32", gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
        heldout_fraction=args.heldout_fraction, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_target_modules=([t.strip() for t in args.lora_targets.split(",") if t.strip()]
                             if args.lora_targets else None),
        kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha, last_k=args.last_k,
    ).validate()


def _load_teacher(args: argparse.Namespace, device: str):
    """--teacher, or the unpruned source recorded by `shortllm prune`'s export (shortllm.json's plan)."""
    from shortllm.errors import UsageError
    from shortllm.model.loading import load_model

    spec = args.teacher
    if spec is None:
        meta = Path(args.model).expanduser() / "shortllm.json"
        try:
            plan = json.loads(meta.read_text(encoding="utf-8")).get("plan") or {}
        except (OSError, ValueError):
            plan = {}
        spec = plan.get("model_name")
        if not spec:
            raise UsageError(f"--method kd needs a teacher and {meta} records no source model; pass --teacher "
                             "PATH|builtin (the unpruned model).")
    teacher, _ = load_model(spec, device=device)
    return teacher


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from shortllm.model.loading import load_model
    from shortllm.retrain.train_data import load_retrain_data
    from shortllm.retrain.training import prepare_out_dir, retrain_model, save_retrained, world_size

    if args.method != "kd":
        reject_unused(args, f"with --method {args.method}",
                      {"--teacher": None, "--kd-temperature": None, "--kd-alpha": None})
    if args.method != "lora":
        reject_unused(args, f"with --method {args.method}",
                      {"--lora-r": None, "--lora-alpha": None, "--lora-dropout": None, "--lora-targets": None})
    if args.method != "partial":
        reject_unused(args, f"with --method {args.method}", {"--last-k": None})
    cfg = _config(args)
    out = check_output_dir(args.output, overwrite=True)  # writable at all? (prepare_out_dir: new unless --resume)
    prepare_out_dir(out, args.resume)  # fail before the slow model load
    device = resolve_device(args.device, distributed=world_size() > 1)
    model, tok = load_model(args.model, device=device)
    teacher = _load_teacher(args, device) if cfg.method == "kd" else None
    data = load_retrain_data(args.data, tok, cfg.seq_len, cfg.heldout_fraction, args.data_dir)
    result = retrain_model(model, tok, data, cfg, out_dir=out, resume=True, progress=not args.no_progress,
                           teacher=teacher)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0  # every rank holds the same weights; rank 0 writes
    save_retrained(result.model, tok, out / "model", overwrite=True)
    report = {**result.to_dict(), "model_in": str(args.model), "data": data.source, "model_out": str(out / "model"),
              "teacher": (str(args.teacher) if args.teacher else "from shortllm.json") if teacher is not None else None}
    atomic_write_text(out / "retrain.json", json.dumps(report, indent=1))
    after = f"{result.ppl_after:.3f}" if result.ppl_after is not None else "n/a"
    before = f"{result.ppl_before:.3f}" if result.ppl_before is not None else "n/a"
    print(f"retrain[{cfg.method}]: {result.steps_done} steps, {result.tokens_seen} tokens, held-out PPL "
          f"{before} -> {after}; model in {out / 'model'}")
    return 0
