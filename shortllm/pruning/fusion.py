"""The fused inference model: fewer, larger matmuls per kept block, and removed branches skipped.

`fuse(model)` keeps the Hugging Face model class, its decoder loop, masks, rotary embeddings and cache
(so `generate`, KV cache and sliding windows behave as in transformers) and swaps, in every block:

- attention -> `FusedAttention`: q/k/v as one Linear ([q; k; v] rows, biases concatenated), then the
  model's own rotary, q/k norms (Qwen3, Gemma-3), attention function (eager/sdpa of its config,
  sliding window, soft-capping) and o_proj;
- gated MLP -> `FusedMLP`: gate/up as one Linear ([gate; up] rows), act(gate) * up, down_proj;
- a branch whose output projection is all zeros (how `shortllm.prune` writes a removed branch) is
  dropped from the compute together with the norms around it; a dropped attention still records its
  tokens in the KV cache (one zero key/value of width 1 per token) so cache lengths, and so positions
  and mask sizes, stay right.

Supported: llama, mistral, qwen2, qwen3 (and SmolLM2), gemma, gemma2, gemma3_text, phi3 (already fused:
only branch dropping applies). gpt2 and gpt_neox already store q/k/v fused; opt is not supported.
Checkpoints: `export(model, dir, fused=True)` writes config + `fused*.safetensors` (no HF weights file,
so plain `from_pretrained` refuses it instead of loading random weights); `load_fused(dir)` reads it.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from shortllm.errors import ModelLoadError, UnsupportedModelError
from shortllm.model.adapters import get_adapter

FUSABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
LAYOUT_FILE = "fused_layout.json"
# fused vs unfused logits, (rtol, atol) by dtype, checked in tests/test_fuse.py on random tiny models:
# the fused matmul sums the same products, but a larger GEMM may block the reduction differently
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2)}
WEIGHTS_NAME = "fused.safetensors"


# The keywords under which a decoder layer hands its attention module the KV cache: transformers 5.24
# renamed `past_key_values` to `cache` (the old name is deprecated, still accepted by HF's own modules).
# A fused attention that missed the cache would not fail: it would attend to the new tokens only and
# diverge from the second generated token on (tests/test_hf_internals.py pins the name per version).
CACHE_KWARGS = ("cache", "past_key_values")


def take_cache(kwargs: dict):
    """Pop the KV cache out of an attention module's keyword arguments, under whichever name the running
    transformers used; None when there is none. Refuses a cache it cannot place (two different ones, or a
    Cache object under an unknown keyword: a future rename) instead of silently computing without it."""
    from transformers.cache_utils import Cache

    given = [(k, kwargs.pop(k)) for k in CACHE_KWARGS if k in kwargs]
    live = [(k, c) for k, c in given if c is not None]
    if len(live) == 2 and live[0][1] is not live[1][1]:
        raise RuntimeError(f"the attention module got two different KV caches ({live[0][0]}= and {live[1][0]}=); "
                           "pass the cache under one name")
    stray = sorted(k for k, v in kwargs.items() if isinstance(v, Cache))
    if stray:
        raise UnsupportedModelError(
            f"a KV cache reached the fused attention as {stray}, a keyword shortllm.pruning.fusion does not know "
            f"(it reads {CACHE_KWARGS}); this transformers version renamed it again: add the name to "
            "shortllm.pruning.fusion.CACHE_KWARGS, or generate with the unfused model")
    return live[0][1] if live else None


class FusedAttention(nn.Module):
    """q/k/v in one projection; everything else is the original attention's (module and functions)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        src = sys.modules[type(attn).__module__]
        self._rotary = src.apply_rotary_pos_emb
        self._eager = src.eager_attention_forward
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.attention_dropout = getattr(attn, "attention_dropout", 0.0)
        self.is_causal = True
        self.extra = {k: getattr(attn, a) for k, a in (("sliding_window", "sliding_window"),
                                                      ("softcap", "attn_logit_softcapping")) if hasattr(attn, a)}
        if hasattr(attn, "qkv_proj"):  # phi3
            self.qkv_proj = attn.qkv_proj
            n_q = attn.config.num_attention_heads * self.head_dim
        else:
            qs = (attn.q_proj, attn.k_proj, attn.v_proj)
            n_q = qs[0].out_features
            bias = qs[0].bias is not None
            self.qkv_proj = nn.Linear(qs[0].in_features, sum(q.out_features for q in qs), bias=bias,
                                      device=qs[0].weight.device, dtype=qs[0].weight.dtype)
            with torch.no_grad():
                self.qkv_proj.weight.copy_(torch.cat([q.weight for q in qs], 0))
                if bias:
                    self.qkv_proj.bias.copy_(torch.cat([q.bias for q in qs], 0))
        n_kv = (self.qkv_proj.out_features - n_q) // 2
        self.split = (n_q, n_kv, n_kv)
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.o_proj = attn.o_proj

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = take_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.qkv_proj(hidden_states).split(self.split, dim=-1)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        if cache is not None:
            # transformers >= 5.24 lets the cache rewrite the attention kwargs in place (paged caches), so it
            # gets the same dict the attention function then receives; older caches swallow it in **kwargs
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, weights = fn(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                          scaling=self.scaling, **self.extra, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class FusedMLP(nn.Module):
    """gate/up in one projection: down(act(gate) * up)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        g, u = mlp.gate_proj, mlp.up_proj
        bias = g.bias is not None
        self.gate_up_proj = nn.Linear(g.in_features, g.out_features * 2, bias=bias, device=g.weight.device,
                                      dtype=g.weight.dtype)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(torch.cat([g.weight, u.weight], 0))
            if bias:
                self.gate_up_proj.bias.copy_(torch.cat([g.bias, u.bias], 0))
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class DroppedAttention(nn.Module):
    """A removed attention branch: contributes exactly zero, keeps the cache length in step."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, **kwargs):
        cache = take_cache(kwargs)
        if cache is not None:
            # Not a zero-size tensor: DynamicLayer reports length 0 when its keys have no elements, and the
            # model sizes the masks of a whole attention type from its first layer (and positions from layer
            # 0): a dropped first full-attention layer would then mask every later step wrongly (left padding).
            # One head of width 1 per token costs B*T numbers per dropped layer.
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return hidden_states.new_zeros(()), None


class DroppedMLP(nn.Module):
    def forward(self, x):
        return x.new_zeros(())


def _is_zero(proj: nn.Module) -> bool:
    w = getattr(proj, "weight", None)
    b = getattr(proj, "bias", None)
    return w is not None and not w.is_meta and not bool(w.any()) and (b is None or not bool(b.any()))


def _norms(block: nn.Module, kind: str) -> tuple[str, ...]:
    gemma_like = hasattr(block, "pre_feedforward_layernorm")
    if kind == "attn":
        return ("input_layernorm", "post_attention_layernorm") if gemma_like else ("input_layernorm",)
    return ("pre_feedforward_layernorm", "post_feedforward_layernorm") if gemma_like else ("post_attention_layernorm",)


def dropped_branches(model: nn.Module) -> list[tuple[str, int]]:
    """(kind, block) of every branch whose output projection is all zeros (a removed branch)."""
    ad = get_adapter(model)
    out = []
    for i, block in enumerate(ad.blocks()):
        for kind in ("attn", "mlp"):
            proj = ad.attn_out(block) if kind == "attn" else ad.mlp_out(block)
            dropped = isinstance(ad.branch(block, kind), (DroppedAttention, DroppedMLP))
            if dropped or (proj is not None and _is_zero(proj)):
                out.append((kind, i))
    return out


def fuse(model: nn.Module, inplace: bool = False, dropped: Optional[list] = None) -> nn.Module:
    """The fused inference model of `model` (a deep copy unless `inplace`). `dropped` lists the
    (kind, block) branches to drop; by default every branch whose output projection is all zeros."""
    mt = getattr(model.config, "model_type", "")
    if mt not in FUSABLE:
        raise UnsupportedModelError(f"fuse supports {', '.join(FUSABLE)}; {mt!r} is not one of them (gpt2 and "
                                    "gpt_neox already keep q/k/v fused); export it unfused instead")
    if getattr(model, "shortllm_fused", False):
        return model
    dropped = [tuple(x) for x in (dropped_branches(model) if dropped is None else dropped)]
    if not inplace:
        model = copy.deepcopy(model)
    ad = get_adapter(model)
    for i, block in enumerate(ad.blocks()):
        for kind in ("attn", "mlp"):
            name = ad.spec.attn if kind == "attn" else ad.spec.mlp
            if (kind, i) in dropped:
                new = DroppedAttention(ad.attn(block).layer_idx) if kind == "attn" else DroppedMLP()
                for norm in _norms(block, kind):
                    setattr(block, norm, nn.Identity())
            elif kind == "attn":
                new = FusedAttention(ad.attn(block))
            else:
                mlp = ad.mlp(block)
                new = FusedMLP(mlp) if hasattr(mlp, "gate_proj") else mlp
            setattr(block, name, new)
    model.shortllm_fused = True
    model.shortllm_dropped = sorted(dropped)
    return model


def save_fused(model: nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
    """Write config, generation config and fused weights (sharded, deduplicated ties) into `directory`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from shortllm.io.checkpoint_files import check_index

    fused = model if getattr(model, "shortllm_fused", False) else fuse(model)
    d = Path(directory)
    fused.config.save_pretrained(str(d))
    if getattr(fused, "generation_config", None) is not None:
        fused.generation_config.save_pretrained(str(d))
    sd = fused.state_dict()
    canon: dict = {}
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in canon:
            aliases[k] = canon[key]
        else:
            canon[key] = k
            tensors[k] = t.detach().contiguous()
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="fused{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (d / "fused.safetensors.index.json").write_text(json.dumps(index, indent=1))
        check_index(d, "fused.safetensors.index.json")
    layout = {"format": "shortllm.fused/1", "model_type": fused.config.model_type,
              "dropped": [list(x) for x in fused.shortllm_dropped], "aliases": aliases,
              "dtype": str(next(fused.parameters()).dtype).replace("torch.", "")}
    (d / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))


def load_fused(directory: str | os.PathLike, dtype: Optional[torch.dtype] = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint written by `export(..., fused=True)` as the fused model, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    d = Path(directory)
    if not (d / LAYOUT_FILE).is_file():
        raise ModelLoadError(f"{d} is not a fused shortllm checkpoint (no {LAYOUT_FILE}); write one with "
                             "shortllm.pruning.exporting.export(model, dir, fused=True), or load a plain one with "
                             "from_pretrained")
    layout = json.loads((d / LAYOUT_FILE).read_text())
    config = AutoConfig.from_pretrained(str(d))
    dtype = dtype or getattr(torch, layout.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fuse(model, inplace=True, dropped=[tuple(x) for x in layout["dropped"]])
    index = d / "fused.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_NAME]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not (d / f).is_file():
            raise ModelLoadError(f"{d / f} is missing; the fused checkpoint is incomplete: export it again")
        sd.update(load_file(str(d / f)))
    for alias, canon in layout["aliases"].items():
        sd[alias] = sd[canon]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{d}: fused weights do not match the config ({exc}); export it again") from exc
    if (d / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(d))
    return model.to(device=device, dtype=dtype).eval()


__all__ = ["fuse", "load_fused", "save_fused", "dropped_branches", "FusedAttention", "FusedMLP", "TOLERANCE",
           "CACHE_KWARGS", "take_cache"]
