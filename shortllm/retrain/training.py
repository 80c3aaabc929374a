"""Recover a pruned model: LoRA (through peft) or continued pretraining (full-parameter AdamW).

    cfg = RetrainConfig(method="lora", steps=200)
    data = load_retrain_data("ptb", tokenizer, cfg.seq_len)
    result = retrain_model(model, tokenizer, data, cfg, out_dir="runs/lora")
    save_retrained(result.model, tokenizer, "pruned-lora")      # a stock transformers checkpoint

Determinism and resume: the examples of optimizer step ``s`` are a pure function of ``(seed, s)`` (one
seeded permutation per epoch), the torch RNG used by dropout is re-seeded from ``(seed, s)`` at every
step inside `torch.random.fork_rng` (the caller's RNG is untouched), and the LR is computed from ``s``.
A checkpoint therefore needs only the trainable weights, the AdamW state tensors (safetensors) and a
JSON file of scalars; resuming from step ``k`` gives weights bit-identical to an uninterrupted run on
the same device and thread settings. Nothing is ever pickled.

Checkpoints (format in `shortllm.retrain.checkpoints`) go to ``out_dir/checkpoints/step-NNNNNNNN/``, each
written to a temp dir and renamed into place, so a killed run leaves only complete checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from shortllm.errors import CheckpointError, DataError, ExportError, NonFiniteError, RetrainConfigError, ShortLLMError
from shortllm.evaluation.head import head_hidden, lm_head_and_params
from shortllm.io.atomic import publish_dir, temp_dir_beside
from shortllm.ops import lm_head_nll
from shortllm.retrain.checkpoints import checkpoint_dirs, load_checkpoint, model_fingerprint, save_checkpoint
from shortllm.retrain.config import RetrainConfig, RetrainResult
from shortllm.retrain.train_data import RetrainData, load_retrain_data

_FORMAT = 1


# ---------------------------------------------------------------- model helpers
def _blocks(model: nn.Module) -> nn.ModuleList:
    try:
        from shortllm.model.adapters import get_adapter
        return get_adapter(model).blocks()
    except ShortLLMError:
        n = getattr(model.config, "num_hidden_layers", None)
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if not lists:
            raise
        return lists[0]


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def lora_target_modules(model: nn.Module, leaves: Optional[list[str]] = None) -> list[str]:
    """Full names of the Linear/Conv1D modules inside the decoder blocks (filtered by leaf name)."""
    blocks = _blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    names = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and _is_projection(m)]
    if leaves is not None:
        found = {n.rsplit(".", 1)[-1] for n in names}
        missing = sorted(set(leaves) - found)
        if missing:
            raise RetrainConfigError(f"LoRA target(s) {missing} are not Linear modules in the blocks of this "
                                     f"model; available: {sorted(found)}.")
        names = [n for n in names if n.rsplit(".", 1)[-1] in set(leaves)]
    if not names:
        raise RetrainConfigError("No Linear module found inside the decoder blocks; pass lora_target_modules.")
    return names


def _collate(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, device) -> dict:
    n = max(int(e[0].numel()) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : x.numel()], labels[i, : y.numel()], mask[i, : x.numel()] = x, y, 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _n_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def _nll_sum(model: nn.Module, batch: dict, autocast_dtype) -> torch.Tensor:
    """Summed token NLL through the one token-NLL path of the package (the chunked `lm_head_nll` op, as
    scoring and evaluation use it): the model runs up to its LM head's input and the [N, V] logits are
    never built, in training too (the op has a backward)."""
    dev = batch["input_ids"].device.type
    head, hp = lm_head_and_params(model)
    with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        h = head_hidden(model, batch["input_ids"], batch["attention_mask"], head=head)
    labels = batch["labels"][:, 1:].reshape(-1)
    rows = (labels != -100).nonzero()[:, 0]
    # only the predictions that count go through the head; the head runs in its weight's dtype (fp32 master
    # weights under bf16 autocast), as the logits' `.float()` did before
    h = h[:, :-1].reshape(-1, h.shape[-1])[rows].to(hp["weight"].dtype)
    nll = lm_head_nll(h, hp["weight"], labels[rows], bias=hp["bias"], softcap=hp["softcap"], scale=hp["scale"])
    return nll.sum(dtype=torch.float32)


@torch.no_grad()
def heldout_ppl(model: nn.Module, examples: list, batch_size: int = 4, pad_id: int = 0,
                autocast_dtype: Optional[torch.dtype] = None) -> float:
    """exp(mean NLL over every labelled, predicted token of ``examples``)."""
    if not examples:
        raise DataError("No held-out example to evaluate; raise heldout_fraction above 0.")
    was_training, dev = model.training, next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = _collate(examples[i: i + batch_size], pad_id, dev)
        total += float(_nll_sum(model, batch, autocast_dtype))
        n += _n_targets(batch["labels"])
    model.train(was_training)
    if n == 0:
        raise DataError("The held-out examples have no labelled token to predict.")
    return math.exp(total / n)


def _step_examples(data: RetrainData, cfg: RetrainConfig, step: int) -> list[list]:
    # Sample positions of step s are [s*B, (s+1)*B) in an endless stream of seeded per-epoch permutations.
    n, per_step = len(data.train), cfg.micro_batch_size * cfg.grad_accum
    out, perms = [], {}
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch = pos // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(data.train[perms[epoch][pos % n]])
    return [out[i: i + cfg.micro_batch_size] for i in range(0, per_step, cfg.micro_batch_size)]


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed gradient_* to activation_* (the old names warn); accept both
    new = hasattr(model, "activation_checkpointing_enable")
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    new = hasattr(model, "activation_checkpointing_enable")
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


@contextlib.contextmanager
def _seeded(seed: int, dev: torch.device):
    """A private RNG scope seeded with ``seed``; the caller's CPU (and this CUDA device's) state is restored."""
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------- training
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
    return root  # created by the first checkpoint, so a run that fails early leaves nothing behind


def _wrap_lora(model: nn.Module, cfg: RetrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, cfg.lora_target_modules)
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lcfg)


def retrain_model(model: nn.Module, tokenizer, data: RetrainData | str | os.PathLike,
            config: Optional[RetrainConfig] = None, out_dir: Optional[str | os.PathLike] = None,
            resume: bool = False, progress: bool = True, stop_after: Optional[int] = None,
            data_dir: Optional[str | os.PathLike] = None) -> RetrainResult:
    """Train ``model`` in place (LoRA: merged back into plain weights at the end) and return a `RetrainResult`.

    ``data``: prepared `RetrainData`, or a spec for `load_retrain_data` (corpus name, file, folder).
    ``out_dir``: where checkpoints go (every ``save_every`` steps and at the end); it must be new or
    empty unless ``resume=True``, which continues from its newest checkpoint (or starts fresh if it has
    none). Resume needs the same starting model (checked by fingerprint), data and config.
    ``stop_after``: leave after this many optimizer steps in this call (a checkpoint is written if
    ``out_dir`` is set), for time-sliced jobs; ``result.completed`` tells whether all steps ran.
    """
    cfg = (config or RetrainConfig()).validate()
    if not isinstance(data, RetrainData):
        data = load_retrain_data(data, tokenizer, cfg.seq_len, cfg.heldout_fraction, data_dir)
    if not data.train:
        raise DataError("The training split is empty; give more data.")
    root = prepare_out_dir(out_dir, resume)
    t0 = time.perf_counter()
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if t is not None), 0)
    autocast = torch.bfloat16 if cfg.dtype == "bf16" else None
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.float()  # fp32 master weights; bf16 is an autocast compute dtype here
    dev = next(model.parameters()).device
    heldout = data.heldout[: cfg.eval_max_examples] if cfg.eval_max_examples else data.heldout
    identity = {"format": _FORMAT, "config": cfg.to_dict(), "data": data.fingerprint(),
                "model": model_fingerprint(model)}

    ckpts = checkpoint_dirs(root) if (root is not None and resume) else []
    ppl_before = heldout_ppl(model, heldout, cfg.micro_batch_size, pad_id, autocast) if heldout and not ckpts else None
    if cfg.method == "lora":
        with _seeded(cfg.seed, dev):  # LoRA A-matrix init is random: make it a function of the seed
            train_model = _wrap_lora(model, cfg)
    else:
        train_model = model
    was_gc = _checkpointing(model)
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, True)
    params = {n: p for n, p in train_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.resolved_lr, weight_decay=cfg.weight_decay,
                            foreach=False)
    step, tokens, targets, losses, history = 0, 0, 0, [], []
    completed = ok = False
    try:
        if ckpts:
            state = load_checkpoint(ckpts[-1], params, opt, expect=identity)
            step, tokens, targets = state["step"], state["tokens_seen"], state["target_tokens"]
            losses, ppl_before = state["losses"], state["ppl_before"]
            history = [tuple(x) for x in state["eval_history"]]
        train_model.train()
        stop_at = cfg.steps if stop_after is None else min(cfg.steps, step + max(0, int(stop_after)))
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"retrain[{cfg.method}]", disable=not progress, unit="step")
        while step < stop_at:
            micro = [_collate(m, pad_id, dev) for m in _step_examples(data, cfg, step)]
            n_tok = sum(_n_targets(b["labels"]) for b in micro)
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            loss_sum = 0.0
            with _seeded(cfg.seed * 1_000_003 + 7919 * step + 1, dev):
                for b in micro:  # normalise by the step's token count: accumulation == one big batch
                    loss = _nll_sum(train_model, b, autocast) / max(1, n_tok)
                    loss.backward()
                    loss_sum += float(loss.detach())
                    tokens += int(b["attention_mask"].sum())
            if not math.isfinite(loss_sum):  # before the update, so the weights stay finite
                raise NonFiniteError(f"Training loss became {loss_sum} at step {step}; lower lr "
                                     f"(now {cfg.resolved_lr}) or use dtype='fp32'.")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, targets = step + 1, targets + n_tok
            losses.append(loss_sum)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{cfg.lr_at(step - 1):.2e}")
            if cfg.eval_every and step % cfg.eval_every == 0 and heldout and step < cfg.steps:
                history.append((step, heldout_ppl(train_model, heldout, cfg.micro_batch_size, pad_id, autocast)))
                train_model.train()
            if root is not None and ((cfg.save_every and step % cfg.save_every == 0) or step == stop_at):
                save_checkpoint(root, step, params, opt, {**identity, "step": step, "tokens_seen": tokens,
                                 "target_tokens": targets, "losses": losses, "eval_history": history,
                                 "ppl_before": ppl_before}, cfg.keep_checkpoints)
        bar.close()
        completed, ok = step >= cfg.steps, True
    finally:
        if cfg.method == "lora":
            # merge on success/early stop; on an exception only strip the adapters so `model` is unchanged
            train_model = train_model.merge_and_unload() if ok else train_model.unload()
        if cfg.gradient_checkpointing and not was_gc:
            _set_checkpointing(train_model, False)
        train_model.eval()
    ppl_after = heldout_ppl(train_model, heldout, cfg.micro_batch_size, pad_id, autocast) if heldout else None
    if completed and heldout:
        history.append((step, ppl_after))
    return RetrainResult(method=cfg.method, steps_done=step, completed=completed, tokens_seen=tokens,
                         target_tokens=targets, losses=list(losses), ppl_before=ppl_before, ppl_after=ppl_after,
                         eval_history=history, wall_s=time.perf_counter() - t0, config=cfg.to_dict(),
                         model=train_model)


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

