"""How evaluation reaches a model: the LM head's input, captured before any logits exist.

NLL never materialises [tokens, vocab] logits: the model runs up to its LM head's input (captured by a
pre-hook that stops the forward there) and `shortllm.ops.lm_head_nll` applies the head (weight, bias,
logit scale and Gemma's final softcapping) in row chunks.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from shortllm.errors import UnsupportedModelError


class _StopAtHead(Exception):
    """Raised by the head pre-hook: everything the loss needs has been captured."""


def lm_head_and_params(model: nn.Module) -> tuple[nn.Module, dict]:
    """The LM head module and what `lm_head_nll` needs to reproduce the model's logits exactly."""
    try:
        from shortllm.model.adapters import get_adapter
        adapter = get_adapter(model)
        return adapter.lm_head(), adapter.head_params()
    except (ImportError, UnsupportedModelError):
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head; load it with "
                                        "AutoModelForCausalLM.") from None
        cfg = model.config
        return head, {"weight": head.weight, "bias": getattr(head, "bias", None),
                      "softcap": float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
                      "scale": float(getattr(cfg, "logit_scale", None) or 1.0)}


def head_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                head: Optional[nn.Module] = None) -> Tensor:
    """The LM head's input [B, T, D] for ``input_ids``: whatever the model feeds its head (final norm,
    OPT's project_out, ...), captured by a pre-hook that stops the forward before any logits exist.
    Runs in the caller's grad mode: evaluation calls it under no_grad, retraining with grad (the
    captured tensor keeps its autograd history)."""
    head = head if head is not None else lm_head_and_params(model)[0]
    box: dict = {}

    def grab(_mod, args, kwargs):
        box["h"] = args[0] if args else next(iter(kwargs.values()))
        raise _StopAtHead

    handle = head.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopAtHead:
        pass
    finally:
        handle.remove()
    if "h" not in box:
        raise UnsupportedModelError(f"{type(model).__name__}.forward never called its LM head "
                                    f"{type(head).__name__}; evaluation needs a *ForCausalLM model.")
    return box["h"]


def encode_text(tokenizer, text: str) -> list[int]:
    # verbose=False: whole-split strings exceed model_max_length on purpose (we chunk them)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
