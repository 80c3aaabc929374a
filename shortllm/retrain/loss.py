"""The retraining loss without [N, V] logits: cross-entropy (and KD against a teacher) computed from the LM
head's input inside the model's own forward, so DDP/FSDP/peft wrappers see an ordinary forward."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from shortllm.errors import DataError, RetrainConfigError
from shortllm.evaluation.head import head_hidden, lm_head_and_params
from shortllm.ops.cross_entropy import lm_head_kd, lm_head_nll
from shortllm.retrain.config import RetrainConfig
from shortllm.retrain.train_data import collate


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP (``.module``) and peft (``get_base_model``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _teacher_rows(teacher: nn.Module, batch: dict, rows: Tensor) -> tuple[Tensor, dict]:
    with torch.no_grad():
        head, hp = lm_head_and_params(teacher)
        h = head_hidden(teacher, batch["input_ids"], batch["attention_mask"], head=head)
    return h.reshape(-1, h.shape[-1])[rows], hp


def forward_loss(model: nn.Module, batch: dict, cfg: RetrainConfig, teacher: Optional[nn.Module] = None,
                 method: Optional[str] = None) -> tuple[Tensor, int]:
    """Summed loss of ``batch`` over its target tokens, and their count; no [N, V] logits are built.

    The model runs its ordinary forward (through any DDP/FSDP/peft wrapper) with a pre-hook on the LM
    head that computes the loss from the head's input with the chunked ops, inside the forward where
    FSDP has gathered the head's weight, and then passes the head an empty sequence.
    ``method`` overrides ``cfg.method`` (held-out evaluation is always plain NLL: ``"nll"``).
    """
    method = method or cfg.method
    targets = batch["shift_labels"].reshape(-1)
    rows = (targets != -100).nonzero()[:, 0]
    kd_in = _teacher_rows(teacher, batch, rows) if method == "kd" else None
    base = _hf_model(model)
    head, _ = lm_head_and_params(base)
    box: dict = {}

    def hook(_mod, args, kwargs):
        h = args[0] if args else next(iter(kwargs.values()))
        _, hp = lm_head_and_params(base)  # read now: FSDP swaps in the gathered weight for the forward
        w = hp["weight"]
        hs = h.reshape(-1, h.shape[-1])[rows].to(w.dtype)  # fp32 master weights under bf16 autocast
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32  # the ops' accumulation dtype
        loss = torch.zeros((), dtype=acc, device=h.device)
        alpha = cfg.get("kd_alpha") if method == "kd" else 1.0
        if alpha > 0:
            nll = lm_head_nll(hs, w, targets[rows], bias=hp["bias"], softcap=hp["softcap"], scale=hp["scale"])
            loss = loss + alpha * nll.sum(dtype=acc)
        if method == "kd":
            ht, tp = kd_in
            kd = lm_head_kd(hs, w, ht, tp["weight"], bias=hp["bias"], bias_teacher=tp["bias"],
                            temperature=cfg.get("kd_temperature"), softcap=hp["softcap"], scale=hp["scale"],
                            softcap_teacher=tp["softcap"], scale_teacher=tp["scale"])
            loss = loss + (1.0 - alpha) * kd.sum(dtype=acc)
        box["loss"] = loss
        empty = h.narrow(-2, 0, 0)
        return ((empty,) + tuple(args[1:]), kwargs) if args else ((), {next(iter(kwargs)): empty})

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    if "loss" not in box:
        raise RetrainConfigError(f"{type(base).__name__}.forward never called its LM head; retraining needs a "
                                 "*ForCausalLM model.")
    return box["loss"], int(rows.numel())


@torch.no_grad()
def heldout_ppl(model: nn.Module, examples: list, cfg: RetrainConfig, pad_id: int = 0) -> float:
    """exp(mean NLL over every labelled, predicted token of ``examples``), in micro-batches."""
    if not examples:
        raise DataError("No held-out example to evaluate; raise heldout_fraction above 0.")
    was_training, dev = model.training, next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), cfg.micro_batch_size):
        batch = {k: v.to(dev) for k, v in collate(examples[i: i + cfg.micro_batch_size], pad_id).items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            s, k = forward_loss(model, batch, cfg, method="nll")
        total, n = total + float(s), n + k
    model.train(was_training)
    if n == 0:
        raise DataError("The held-out examples have no labelled token to predict.")
    return math.exp(total / n)
