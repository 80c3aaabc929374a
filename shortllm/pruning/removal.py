"""Depth pruning: remove the blocks (and branches) of a Plan from a Hugging Face causal LM.

The result is a model of the same class that `save_pretrained` / `from_pretrained` round-trip exactly:

- the decoder-block ModuleList keeps only the plan's kept blocks, in order;
- the layer-count config key (`num_hidden_layers`, GPT-2's `n_layer`) and every per-layer config list
  (`layer_types`, and any top-level list of length L but known non-layer ones such as `architectures`;
  sub-configs like `text_config` are not walked) follow the kept blocks;
- lists of layer INDICES (`mlp_only_layers`, attention-layer index lists: an index-like name, ints in
  [0, L)) are remapped to the new indices, removed blocks dropped;
- index thresholds are rewritten to keep each kept block's behaviour: Qwen2/3 `max_window_layers`
  (block i slides iff i >= max_window_layers) becomes the number of kept blocks below the old
  threshold, which is always expressible because kept blocks keep their order;
- Gemma-3's `sliding_window_pattern` (block i slides iff (i+1) % pattern != 0) generally cannot express
  the kept blocks' types after a removal; `layer_types`, which transformers reads in preference to the
  pattern, is rewritten instead, and the pattern is left as it was (it is only a fallback for configs
  without `layer_types`);
- every `layer_idx` attribute inside a kept block (attention modules, Gemma-3 decoder layers) is
  renumbered, so the KV cache gets one slot per kept block (the classic cached-generation crash);
- GPT-2 with `scale_attn_by_inverse_layer_idx` scales attention by 1/(layer_idx+1): the change of
  index is folded into the block's query weights and bias, so logits are unchanged;
- a removed branch (`plan.removed_branches`) becomes a zeroed output projection (weight and bias), so its
  residual contribution is exactly zero and the checkpoint loads in plain transformers; `shortllm.fuse`
  drops such branches from the compute.

Heterogeneous configs (transformers' sparse `per_layer_config`) are refused with a PlanError; branch
removal on post-layer-norm blocks (OPT with `do_layer_norm_before=False`), where a zeroed branch still
normalises the residual stream, with an UnsupportedModelError.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from shortllm.errors import PlanError, UnsupportedModelError
from shortllm.model.adapters import get_adapter, resolve
from shortllm.model.layer_config import (
    derived_layer_lists,
    index_lists,
    layer_count,
    per_layer_lists,
    stored_count_keys,
)
from shortllm.pruning.plans import Plan

INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")


def prune(model: nn.Module, plan: Plan, *, inplace: bool = True, check_weights: bool = True) -> nn.Module:
    """Apply `plan` to `model` and return the pruned model.

    With `inplace=True` (default) `model` itself is modified (no extra memory) and returned; with
    `inplace=False` a deep copy is pruned and `model` is left untouched. The plan must be for this
    model (layer count, parameter names/shapes and, with `check_weights`, weights): else PlanError.
    The plan is attached as `model.shortllm_plan` (export writes it into shortllm.json).
    """
    if getattr(model, "shortllm_plan", None) is not None:
        raise PlanError("this model was already pruned by shortllm; apply a plan to the original model "
                        "(a plan's indices refer to the unpruned blocks)")
    plan.check_model(model, check_weights=check_weights)
    cfg = model.config
    if getattr(cfg, "is_heterogeneous", False):
        raise PlanError("this model has a heterogeneous per_layer_config, which shortllm cannot rewrite yet; "
                        "prune a homogeneous model")
    if plan.removed_branches:
        get_adapter(model).refuse_branch_removal()  # before anything is copied or changed
    _refuse_inexpressible(get_adapter(model).depth_config(), plan)
    if not inplace:
        model = copy.deepcopy(model)
        cfg = model.config
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    with torch.no_grad():
        for kind, b in plan.removed_branches:
            _zero_branch(adapter, blocks[b], kind)
    kept = plan.kept
    new_index = plan.new_index
    with torch.no_grad():
        for old in kept:
            _renumber(model, blocks[old], old, new_index[old])
    parent_path, _, attr = adapter.spec.blocks.rpartition(".")
    parent = resolve(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in kept]))
    cfg = adapter.depth_config()  # a multimodal wrapper's text_config
    changes = rewrite_config(cfg, plan, adapter.spec.per_layer_config)
    _refresh_module_state(model, cfg)
    model.shortllm_plan = plan
    model.shortllm_config_changes = changes
    return model


def _refuse_inexpressible(cfg, plan: Plan) -> None:
    """PlanError when a per-layer list the config derives from a pattern (Jamba's attention / expert layers from
    a period and an offset) would not follow the kept blocks: the checkpoint could not express the pruned model."""
    derived = derived_layer_lists(cfg, plan.num_layers)
    if not derived:
        return
    trial = copy.deepcopy(cfg)
    rewrite_config(trial, plan)
    for name, old in derived.items():
        want = [old[i] for i in plan.kept]
        if list(getattr(trial, name)) != want:
            raise PlanError(f"config.{name} is computed from a layer pattern, not stored: after removing blocks "
                            f"{plan.removed} it would read {list(getattr(trial, name))} instead of the kept blocks' "
                            f"{want}, so a checkpoint cannot express this pruned model; remove blocks that keep the "
                            "pattern (e.g. whole periods of it)")


def _zero_branch(adapter, block: nn.Module, kind: str) -> None:
    proj = adapter.attn_out(block) if kind == "attn" else adapter.mlp_out(block)
    if proj is None or getattr(proj, "weight", None) is None:
        raise PlanError(f"{adapter.model_type}: no {kind} output projection at "
                        f"'{adapter.spec.attn_out if kind == 'attn' else adapter.spec.mlp_out}'; "
                        "set it in the ArchSpec to remove this branch")
    proj.weight.zero_()
    if getattr(proj, "bias", None) is not None:
        proj.bias.zero_()


def _renumber(model: nn.Module, block: nn.Module, old: int, new: int) -> None:
    for mod in block.modules():
        for name in INDEX_ATTRS:
            if isinstance(getattr(mod, name, None), int) and not isinstance(getattr(mod, name), bool):
                setattr(mod, name, new)
        if isinstance(getattr(mod, "lambda_init", None), float) and hasattr(mod, "lambda_q1") and old != new:
            _rebase_lambda_init(mod, new)
        if getattr(mod, "scale_attn_by_inverse_layer_idx", False) and hasattr(mod, "c_attn") and old != new:
            # GPT-2: scores are scaled by 1/(layer_idx+1); keep the old scale by rescaling q (weight + bias)
            factor = (new + 1) / (old + 1)
            d = mod.embed_dim
            mod.c_attn.weight[:, :d].mul_(factor)  # Conv1D weight is [in, out]: q is the first d outputs
            mod.c_attn.bias[:d].mul_(factor)
            if hasattr(mod, "scaling"):
                mod.scaling = mod.scaling * (old + 1) / (new + 1)


def _rebase_lambda_init(mod: nn.Module, new: int) -> None:
    """DiffLlama: the attention computes lambda_init from its layer index at construction, and uses it twice:
    lambda = exp(q1.k1) - exp(q2.k2) + lambda_init, and a (1 - lambda_init) output scale. A block renumbered
    old -> new gets lambda_init(new) when reloaded, so its weights are rewritten to give the same function
    under the new constant: o_proj absorbs the scale ratio, and q1 (or q2) moves along k1 (k2) so that
    exp(q1.k1) - exp(q2.k2) shifts by lambda_init(old) - lambda_init(new)."""
    import sys

    fn = getattr(sys.modules[type(mod).__module__], "lambda_init_fn", None)
    if fn is None:
        raise PlanError(f"{type(mod).__name__} has a lambda_init but its module defines no lambda_init_fn: shortllm "
                        "cannot recompute it for a renumbered block; remove only the last blocks")
    lam_old, lam_new = float(mod.lambda_init), float(fn(new))
    shift = lam_old - lam_new
    s1 = float((mod.lambda_q1.double() * mod.lambda_k1.double()).sum())
    s2 = float((mod.lambda_q2.double() * mod.lambda_k2.double()).sum())
    if math.exp(s1) + shift > 0:
        q, k, target = mod.lambda_q1, mod.lambda_k1, math.log(math.exp(s1) + shift) - s1
    else:
        q, k, target = mod.lambda_q2, mod.lambda_k2, math.log(math.exp(s2) - shift) - s2
    kk = float((k.double() ** 2).sum())
    if kk == 0.0:
        raise PlanError(f"{type(mod).__name__}: lambda_k is zero, so the lambda_init of a renumbered block cannot "
                        "be absorbed into the weights; remove only the last blocks")
    q.copy_(q.double() + (target / kk) * k.double())
    mod.o_proj.weight.mul_((1.0 - lam_old) / (1.0 - lam_new))
    mod.lambda_init = lam_new


def rewrite_config(cfg, plan: Plan, per_layer: tuple[str, ...] = ()) -> dict:
    """Rewrite every depth-dependent config field for the kept blocks; returns {field: (old, new)}."""
    L, kept = plan.num_layers, plan.kept
    changes: dict = {}
    # index lists first: an index list that happens to hold L entries must be remapped, not filtered
    index_names = [k for k in index_lists(cfg, L) if k not in per_layer]
    names = set(per_layer) | set(per_layer_lists(cfg, L))
    new_index = plan.new_index
    for k in index_names:
        v = getattr(cfg, k)
        new = type(v)(new_index[i] for i in v if i in new_index)
        changes[k] = (list(v), list(new))
        setattr(cfg, k, new)
    for k in sorted(names):
        v = getattr(cfg, k, None)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) != L:
            raise PlanError(f"config.{k} should hold one entry per block ({L}) but is {v!r}; fix the config")
        new = type(v)(v[i] for i in kept)
        changes[k] = (list(v), list(new))
        setattr(cfg, k, new)
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int) and mwl < L:
        new_mwl = sum(1 for i in kept if i < mwl)
        changes["max_window_layers"] = (mwl, new_mwl)
        cfg.max_window_layers = new_mwl
    spec = get_adapter_spec_key(cfg)
    for key in dict.fromkeys([spec] + stored_count_keys(cfg, L)):  # xLSTM stores num_blocks beside it
        changes[key] = (getattr(cfg, key), len(kept))
        setattr(cfg, key, len(kept))
    pattern = getattr(cfg, "sliding_window_pattern", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(pattern, int) and pattern > 0 and types is not None:
        derived = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(kept))]
        if list(types) != derived:
            changes["sliding_window_pattern"] = (pattern, "not expressible; layer_types rewritten instead")
    return changes


def get_adapter_spec_key(cfg) -> str:
    from shortllm.model.adapters import REGISTRY

    spec = REGISTRY.get(getattr(cfg, "model_type", ""))
    if spec is not None:
        return spec.num_layers_key
    try:
        return layer_count(cfg)[0]  # the attribute the config stores (n_layer, num_layers, ...)
    except UnsupportedModelError:
        return "num_hidden_layers"


def _refresh_module_state(model: nn.Module, cfg) -> None:
    """Attributes that modules derive from the config at construction time."""
    types = getattr(cfg, "layer_types", None)
    for mod in model.modules():
        if hasattr(mod, "has_sliding_layers") and types is not None:
            mod.has_sliding_layers = "sliding_attention" in types
