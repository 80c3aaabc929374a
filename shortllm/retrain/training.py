"""Recover a pruned model on transformers' `Trainer` (accelerate underneath): LoRA, CPT, KD, partial.

    cfg = RetrainConfig(method="kd", tokens=2_000_000)
    data = load_retrain_data("ptb", tokenizer, cfg.seq_len)
    result = retrain_model(model, tokenizer, data, cfg, out_dir="runs/kd", teacher=unpruned)
    save_retrained(result.model, tokenizer, "pruned-kd")      # a stock transformers checkpoint

The same call runs in one process or under ``torchrun`` / ``accelerate launch`` (DDP; FSDP and
DeepSpeed through an accelerate config, see docs/retrain.md): the Trainer owns the loop, the LR
schedule, gradient accumulation, mixed precision, checkpoints (``out_dir/checkpoints/checkpoint-N``,
resumed with ``resume=True``) and progress. What shortllm adds:

- the loss never builds [N, V] logits: a pre-hook on the LM head computes it inside the model's forward
  (so DDP/FSDP see an ordinary forward) from the head's input through the chunked ops
  `lm_head_nll` / `lm_head_kd`, and hands the head an empty sequence;
- the loss is the token-weighted mean over the whole global batch (every micro-batch of every rank),
  so accumulation and data parallelism give the loss and gradient of one big batch;
- data order is a pure function of the seed (`StepStream`), identical for any world size;
- the held-out perplexity before and after (and every ``eval_every`` steps) on the same chunked path.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from shortllm.errors import CheckpointError, DataError, ExportError, NonFiniteError, RetrainConfigError
from shortllm.io.atomic import publish_dir, temp_dir_beside
from shortllm.retrain.config import RetrainConfig, RetrainResult
from shortllm.retrain.loss import forward_loss, heldout_ppl
from shortllm.retrain.methods import freeze_for_partial, wrap_lora
from shortllm.retrain.train_data import RetrainData, StepStream, collate, load_retrain_data


# ---------------------------------------------------------------- the Trainer
def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class DropPickledArgs(TrainerCallback):
        """Checkpoints hold no pickle the resume needs: training_args.bin (a pickled TrainingArguments the
        Trainer writes but never reads back) is removed; optimizer/scheduler/RNG states stay torch files,
        which the Trainer loads with weights_only=True."""

        def on_save(self, args, state, control, **kwargs):
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and (ck / "training_args.bin").is_file():
                (ck / "training_args.bin").unlink()

    class ShortTrainer(Trainer):
        """`Trainer` with shortllm's chunked loss (no [N, V] logits) and held-out-perplexity evaluation."""

        # the loss below is already normalised over the whole accumulated global batch
        loss_is_scaled_for_ga = True

        def __init__(self, *a, shortllm_cfg: RetrainConfig, teacher=None, heldout=(), pad_id=0, **kw):
            super().__init__(*a, **kw)
            self.shortllm_cfg, self.teacher, self.heldout, self.pad_id = shortllm_cfg, teacher, list(heldout), pad_id
            # makes the Trainer count the target tokens (shift_labels != -100) of every micro-batch of the
            # optimizer step on every rank and pass the sum as num_items_in_batch (test_retrain checks it)
            self.model_accepts_loss_kwargs = True
            self.add_callback(DropPickledArgs())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if num_items_in_batch is None:
                raise RetrainConfigError("transformers' Trainer passed no num_items_in_batch; this "
                                         "transformers release counts tokens differently: pin the tested one "
                                         "(constraints.txt).")
            loss_sum, _ = forward_loss(model, inputs, self.shortllm_cfg, self.teacher)
            if not torch.isfinite(loss_sum):
                raise NonFiniteError(f"Training loss became {float(loss_sum)} at step {self.state.global_step}; "
                                     f"lower lr or use dtype='fp32'.")
            # DDP/FSDP average the ranks' gradients; the loss is a sum over the global batch, so undo the mean
            loss = loss_sum / num_items_in_batch * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            ppl = heldout_ppl(self.model, self.heldout, self.shortllm_cfg, self.pad_id)
            metrics = {f"{metric_key_prefix}_ppl": ppl}
            self.log(metrics)
            return metrics

    return ShortTrainer


def _checkpointing_args(args_cls, on: bool) -> dict:
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    name = "activation" if "activation_checkpointing" in args_cls.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": on, f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def _training_args(cfg: RetrainConfig, steps: int, output_dir: Path, progress: bool, save: bool, device):
    from transformers import TrainingArguments

    on_cpu = device.type == "cpu"
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.resolved_lr,
        lr_scheduler_type=cfg.schedule, warmup_steps=cfg.resolved_warmup(steps), weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0, bf16=cfg.dtype == "bf16",
        **_checkpointing_args(TrainingArguments, cfg.gradient_checkpointing),
        seed=cfg.seed, train_sampling_strategy="sequential", dataloader_drop_last=False,
        remove_unused_columns=False, logging_steps=1, logging_strategy="steps", report_to=[],
        disable_tqdm=not progress, save_strategy="steps" if save else "no", save_steps=max(1, cfg.save_every),
        save_total_limit=cfg.keep_checkpoints, eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None, use_cpu=on_cpu, ddp_backend="gloo" if on_cpu and world_size() > 1 else None,
        ddp_find_unused_parameters=False, average_tokens_across_devices=True)


def _check_parallelism(accelerator, cfg: RetrainConfig) -> None:
    """A requested FSDP/DeepSpeed run that accelerate turned into plain data parallelism is an error, not a
    silent fallback: accelerate (1.15) enables them only on accelerators (GPU/XPU/NPU/...), never on CPU."""
    got = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    for env, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and got != kind:
            raise RetrainConfigError(f"The launch asks for {kind} ({env}=true) but accelerate runs {got}: it enables "
                                     f"{kind} only on GPUs/accelerators, not on CPU. Launch without the {kind} "
                                     "config (torchrun / accelerate launch with DDP) on CPU.")
    if got == "FSDP" and cfg.method == "lora":
        raise RetrainConfigError("LoRA under FSDP is not supported (the adapters are small: use DDP, i.e. "
                                 "torchrun or accelerate launch without the FSDP config).")


def _unsharded(trainer, model: nn.Module) -> nn.Module:
    """Under FSDP the trained weights are sharded over the ranks: gather the full state (a collective, on
    every rank) into a plain copy of the model, so the result saves and evaluates as a stock model."""
    if str(getattr(trainer.accelerator.distributed_type, "value", "")) != "FSDP":
        return model
    full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    plain = type(model)(model.config)
    plain.load_state_dict(full)
    return plain


def prepare_out_dir(out_dir: Optional[str | os.PathLike], resume: bool) -> Optional[Path]:
    if out_dir is None:
        if resume:
            raise CheckpointError("resume=True needs out_dir (the folder holding checkpoints/).")
        return None
    root = Path(out_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ExportError(f"Output path {root} is a file; pass a folder path for the run.")
    if root.exists() and not resume and any(root.iterdir()):
        raise ExportError(f"Output folder {root} already exists and is not empty; pass resume=True (CLI: "
                          "--resume) to continue that run, or choose a new folder.")
    return root


def _check_run_identity(root: Path, identity: dict) -> None:
    """``root/run.json`` records what the checkpoints belong to (config, global batch, data and starting
    weights); a resume with anything else is refused instead of mixing two runs. Rank 0 writes it."""
    import json

    from shortllm.io.atomic import atomic_write_text

    path = root / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{path} is unreadable ({e}); delete the run folder or choose a new one.") from e
        for k, v in identity.items():
            if old.get(k) != v:
                raise CheckpointError(f"Cannot resume from {root}: its {k} differs from this run's (checkpoints are "
                                      f"tied to the starting model, data and config); use the same {k} or a new "
                                      "output folder.")
    elif int(os.environ.get("RANK", "0")) == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=1))


def _last_checkpoint(ckdir: Path) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckdir)) if ckdir.is_dir() else None


@contextlib.contextmanager
def _own_rng(seed: int, dev: torch.device):
    """Seed a private RNG scope; the caller's CPU (and this CUDA device's) RNG state is restored after."""
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _prepare_model(model: nn.Module, cfg: RetrainConfig) -> nn.Module:
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.float()  # fp32 master weights; bf16 is an autocast compute dtype
    if cfg.method == "lora":
        return wrap_lora(model, cfg)
    if cfg.method == "partial":
        freeze_for_partial(model, cfg.get("last_k"))
    else:
        model.requires_grad_(True)
    return model


def world_size() -> int:
    """Processes of this run: torchrun / accelerate launch set WORLD_SIZE; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def retrain_model(model: nn.Module, tokenizer, data: RetrainData | str | os.PathLike,
                  config: Optional[RetrainConfig] = None, out_dir: Optional[str | os.PathLike] = None,
                  resume: bool = False, progress: bool = True, teacher: Optional[nn.Module] = None,
                  data_dir: Optional[str | os.PathLike] = None,
                  callbacks: Optional[list] = None) -> RetrainResult:
    """Train ``model`` in place with transformers' Trainer and return a `RetrainResult` (LoRA: merged back
    into plain weights, so ``result.model`` is a stock transformers model).

    ``data``: prepared `RetrainData`, or a spec for `load_retrain_data` (corpus name, file, folder).
    ``teacher``: the model KD distils from (required for ``method="kd"``, refused otherwise); it runs
    under no_grad in eval mode on the student's device.
    ``out_dir``: the Trainer's checkpoints go to ``out_dir/checkpoints`` (every ``save_every`` steps);
    it must be new or empty unless ``resume=True``, which continues from the newest checkpoint (or starts
    fresh if there is none). ``callbacks``: extra `TrainerCallback`s (e.g. to stop a time-sliced job).
    Under torchrun every rank calls this with the same arguments.
    """
    cfg = (config or RetrainConfig()).validate()
    if cfg.method == "kd" and teacher is None:
        raise RetrainConfigError("method='kd' needs a teacher model (CLI: --teacher PATH|builtin; by default the "
                                 "unpruned model recorded in the pruned checkpoint's shortllm.json).")
    if cfg.method != "kd" and teacher is not None:
        raise RetrainConfigError(f"A teacher applies to method='kd' only, not {cfg.method!r}; drop --teacher.")
    if not isinstance(data, RetrainData):
        data = load_retrain_data(data, tokenizer, cfg.seq_len, cfg.heldout_fraction, data_dir)
    if not data.train:
        raise DataError("The training split is empty; give more data.")
    root = prepare_out_dir(out_dir, resume)
    t0 = time.perf_counter()
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if t is not None), 0)
    ws = world_size()
    steps = cfg.resolved_steps(ws)
    stream = StepStream(data, steps, cfg.micro_batch_size * cfg.grad_accum * ws, cfg.seed)
    heldout = data.heldout[: cfg.eval_max_examples] if cfg.eval_max_examples else data.heldout
    dev = next(model.parameters()).device
    if teacher is not None:
        if teacher.config.vocab_size != model.config.vocab_size:
            raise RetrainConfigError(f"The teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                                     f"student's ({model.config.vocab_size}); distil from the model it was "
                                     "pruned from.")
        teacher = teacher.to(dev).eval()  # forward only, under no_grad (forward_loss)
    if root is not None:
        from shortllm.model.fingerprint import weights_fingerprint

        identity = {"config": {k: v for k, v in cfg.to_dict().items() if k != "eval_every"},
                    "global_batch": stream.length // steps, "data": data.fingerprint(),
                    "model": weights_fingerprint(model),
                    "teacher": weights_fingerprint(teacher) if teacher is not None else None}
    ppl_before = heldout_ppl(model, heldout, cfg, pad_id) if heldout else None
    scratch = None if root is not None else Path(tempfile.mkdtemp(prefix="shortllm-retrain-"))
    ckdir = (root / "checkpoints") if root is not None else scratch
    ok = False
    with _own_rng(cfg.seed, dev):  # LoRA's init and the Trainer's set_seed stay out of the caller's RNG
        train_model = _prepare_model(model, cfg)
        try:
            args = _training_args(cfg, steps, ckdir, progress, save=root is not None and cfg.save_every > 0,
                                  device=dev)
            trainer = _trainer_class()(
                model=train_model, args=args, train_dataset=stream, eval_dataset=heldout if cfg.eval_every else None,
                data_collator=lambda ex: collate(ex, pad_id), shortllm_cfg=cfg, teacher=teacher, heldout=heldout,
                pad_id=pad_id, callbacks=callbacks)
            _check_parallelism(trainer.accelerator, cfg)
            if not progress:  # without a progress bar the Trainer prints every log line instead
                from transformers.trainer_callback import PrinterCallback
                trainer.remove_callback(PrinterCallback)
            if root is not None:  # checked here, after every early error, so a failed start leaves no folder
                _check_run_identity(root, identity)
            last = _last_checkpoint(ckdir) if resume else None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                trainer.train(resume_from_checkpoint=last)
            train_model = _unsharded(trainer, train_model)
            ok = True
        finally:
            if cfg.method == "lora":
                # merge on success; on an exception only strip the adapters so `model` is unchanged
                train_model = train_model.merge_and_unload() if ok else train_model.unload()
            if cfg.gradient_checkpointing:
                (getattr(train_model, "activation_checkpointing_disable", None)
                 or train_model.gradient_checkpointing_disable)()
            model.requires_grad_(True)
            train_model.eval()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    history = trainer.state.log_history
    losses = [float(h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = sorted({int(h["step"]): float(h["eval_ppl"]) for h in history if "eval_ppl" in h}.items())
    done = int(trainer.state.global_step)
    ppl_after = heldout_ppl(train_model, heldout, cfg, pad_id) if heldout else None
    if heldout and (not evals or evals[-1][0] != done):
        evals.append((done, ppl_after))
    seen, targets = stream.tokens(done * stream.length // max(1, steps))
    return RetrainResult(method=cfg.method, steps_done=done, completed=done >= steps, tokens_seen=seen,
                         target_tokens=targets, losses=losses, ppl_before=ppl_before, ppl_after=ppl_after,
                         eval_history=evals, wall_s=time.perf_counter() - t0, world_size=ws,
                         parallel=str(getattr(trainer.accelerator.distributed_type, "value", "NO")),
                         config=cfg.to_dict(), model=train_model)


def save_retrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a plain transformers checkpoint (safetensors; a peft model is merged first) atomically."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True or choose a new folder.")
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish_dir(tmp, out, overwrite, ExportError)
    except ExportError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"Could not write {out} ({e}); check free space and permissions.") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
