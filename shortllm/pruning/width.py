"""BASELINE ONLY: a simple structured width pruner, used by the speed benchmark to compare depth pruning
with width pruning at an equal parameter count (Shortened LLaMA's comparison). Not a research-grade
width pruner (no calibration data, no retraining, no per-layer ratios).

Every block loses the same number of attention heads per KV group and of MLP neurons (Hugging Face
configs are uniform across layers), chosen by weight magnitude: a query head's L1 norm over its q_proj
rows and o_proj columns; an MLP neuron's L1 norm over its gate/up rows and down_proj column. KV heads
are kept. The result is a plain transformers model (config `num_attention_heads`, `intermediate_size`,
explicit `head_dim` rewritten) that `save_pretrained` / `from_pretrained` round-trip.
Llama-family gated-MLP models only (llama, mistral, qwen2, qwen3; SmolLM2).
"""
from __future__ import annotations

import torch
from torch import nn

from shortllm.errors import PlanError, UnsupportedModelError
from shortllm.model.adapters import get_adapter

WIDTH_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _shrink_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    b = None if lin.bias is None else lin.bias.data
    if b is not None and rows is not None:
        b = b[rows]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def width_prune(model: nn.Module, ratio: float) -> nn.Module:
    """Remove about `ratio` of the model's parameters by shrinking heads and MLP width, in place."""
    cfg = model.config
    if cfg.model_type not in WIDTH_ARCHS:
        raise UnsupportedModelError(f"the width-pruning baseline supports {WIDTH_ARCHS}, not {cfg.model_type!r}")
    if not 0.0 < ratio < 1.0:
        raise PlanError(f"ratio={ratio} must be in (0, 1)")
    ad = get_adapter(model)
    blocks = ad.blocks()
    L, d = len(blocks), cfg.hidden_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    per_group = H // KV
    total = sum(p.numel() for p in model.parameters())
    target_per_layer = ratio * total / L
    head_params = 2 * d * hd  # q rows + o cols of one query head
    drop_per_group = min(per_group - 1, int(round(ratio * per_group)))
    heads_removed = drop_per_group * KV
    if heads_removed * head_params > target_per_layer:
        drop_per_group, heads_removed = 0, 0
    mlp = ad.mlp(blocks[0])
    neuron_params = mlp.gate_proj.in_features * 3
    inter = cfg.intermediate_size
    n_drop = int(round((target_per_layer - heads_removed * head_params) / neuron_params))
    n_drop = max(0, min(inter - 1, n_drop))
    with torch.no_grad():
        for block in blocks:
            attn, mlp = ad.attn(block), ad.mlp(block)
            if drop_per_group:
                q = attn.q_proj.weight.view(H, hd, d).abs().sum((1, 2))
                o = attn.o_proj.weight.view(d, H, hd).abs().sum((0, 2))
                imp = (q + o).view(KV, per_group)
                keep = torch.sort(torch.topk(imp, per_group - drop_per_group, dim=1).indices, dim=1).values
                heads = (keep + torch.arange(KV, device=keep.device)[:, None] * per_group).reshape(-1)
                dims = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).reshape(-1)
                attn.q_proj = _shrink_linear(attn.q_proj, rows=dims)
                attn.o_proj = _shrink_linear(attn.o_proj, cols=dims)
                attn.num_key_value_groups = per_group - drop_per_group
            if n_drop:
                imp = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                       + mlp.down_proj.weight.abs().sum(0))
                keep = torch.sort(torch.topk(imp, inter - n_drop).indices).values
                mlp.gate_proj = _shrink_linear(mlp.gate_proj, rows=keep)
                mlp.up_proj = _shrink_linear(mlp.up_proj, rows=keep)
                mlp.down_proj = _shrink_linear(mlp.down_proj, cols=keep)
    cfg.head_dim = hd
    cfg.num_attention_heads = H - heads_removed
    cfg.intermediate_size = inter - n_drop
    return model
