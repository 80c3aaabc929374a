"""What each retraining method trains: LoRA adapters on the blocks' projections (peft), or only the LM head
and the last blocks (partial). CPT and KD train every parameter and need nothing here."""
from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from shortllm.errors import RetrainConfigError, ShortLLMError
from shortllm.evaluation.head import lm_head_and_params
from shortllm.retrain.config import RetrainConfig


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


def wrap_lora(model: nn.Module, cfg: RetrainConfig) -> nn.Module:
    """The peft model a LoRA run trains (its adapters' random init is drawn from the current RNG)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, cfg.lora_target_modules)
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
    lcfg = LoraConfig(r=cfg.get("lora_r"), lora_alpha=cfg.get("lora_alpha"), lora_dropout=cfg.get("lora_dropout"),
                      bias="none", target_modules=targets, fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lcfg)


def freeze_for_partial(model: nn.Module, last_k: int) -> list[str]:
    """Leave only the LM head and the last ``last_k`` blocks trainable; return the trainable names.

    With tied embeddings the head's weight *is* the input embedding, so it trains as well (one tensor)."""
    blocks = _blocks(model)
    if last_k > len(blocks):
        raise RetrainConfigError(f"last_k={last_k} exceeds the model's {len(blocks)} blocks; lower --last-k.")
    head, _ = lm_head_and_params(model)
    model.requires_grad_(False)
    for b in list(blocks)[len(blocks) - last_k:]:
        b.requires_grad_(True)
    head.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
