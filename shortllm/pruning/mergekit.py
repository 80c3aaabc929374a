"""The same plan as a mergekit `passthrough` config, for users who slice models with mergekit.

mergekit (PyPI `mergekit`, 0.1.x) slices by `layer_range` and can scale tensors matched by a name
`filter` (a substring of the tensor name). A removed attention / MLP branch is reproduced by scaling
that branch's output projection (weight and bias) by 0, so the filter must name exactly that
projection in the architecture's own tensor names: `o_proj` on Llama is `c_proj` on GPT-2, where the
MLP's output projection is also called `c_proj` — hence the filters are the adapter's dotted paths
(`attn.c_proj` / `mlp.c_proj`), never a bare leaf name.

What mergekit cannot do, checked here rather than left to a silently wrong model:
- configs that carry one entry per layer (`layer_types`: Qwen2/3, Gemma-2/3): mergekit 0.1.x never
  rewrites them, so transformers 5.x refuses the result (or, with the list fixed by hand, loads it
  and silently changes logits) — a warning comment says so; use `shortllm.export` for those;
- GPT-2 with `scale_attn_by_inverse_layer_idx`: attention is scaled by 1/(layer_idx+1), and a
  renumbered block changes scale — `shortllm.prune` folds the change into the query weights, mergekit
  cannot: the function warns (`MergekitWarning`) and writes the warning into the YAML;
- architectures mergekit has no definition for (OPT) are refused (PlanError), and so is a plan with
  removed branches on an architecture whose projections shortllm does not know; whole-block plans of
  other architectures only need `layer_range`.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Optional

from shortllm.errors import PlanError
from shortllm.model.adapters import REGISTRY
from shortllm.pruning.plans import Plan

# transformers 5.x configs that carry per-layer lists mergekit 0.1.x leaves at the old length
PER_LAYER_LIST_TYPES = ("qwen2", "qwen3", "gemma2", "gemma3_text")
# model types of shortllm's registry that mergekit 0.1.5 has an architecture definition for (its
# `_data/architectures/*.json`); OPT has none, so mergekit cannot read an OPT checkpoint at all
MERGEKIT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
                        "gpt_neox")


class MergekitWarning(UserWarning):
    """The mergekit config will build a model that differs from `shortllm.prune`'s."""


def branch_filters(model_type: str) -> dict[str, str]:
    """mergekit tensor-name filters of the attention and MLP output projections of one architecture."""
    spec = REGISTRY.get(model_type) if model_type in MERGEKIT_MODEL_TYPES else None
    if spec is None:
        raise PlanError(f"shortllm does not know the tensor names of {model_type!r} blocks, so it cannot write a "
                        "mergekit filter that zeroes one branch; remove whole blocks only, or use "
                        "`shortllm prune` / shortllm.export for this plan")
    return {"attn": spec.attn_out, "mlp": spec.mlp_out}


def _inverse_layer_idx_scaling(plan: Plan, config: Any) -> bool:
    if plan.model_type != "gpt2":
        return False
    if config is None:
        return True  # unknown: GPT-2 may scale by layer index; say so rather than stay silent
    return bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))


def mergekit_yaml(plan: Plan, model_name_or_path: str, dtype: Optional[str] = None, *, config: Any = None) -> str:
    """A mergekit `passthrough` config that builds the same pruned model from `model_name_or_path`.

    One slice per run of kept blocks, `layer_range: [start, end]` 0-based and END-EXCLUSIVE (mergekit's
    convention, the same as Python's). A kept block with a removed branch gets its own slice whose
    `scale` parameter zeroes that branch's output projection. `config` (the source model's config)
    lets GPT-2's `scale_attn_by_inverse_layer_idx` be checked; without it a GPT-2 plan warns.
    """
    if plan.model_type and plan.model_type not in MERGEKIT_MODEL_TYPES and plan.model_type in REGISTRY:
        raise PlanError(f"mergekit 0.1.x has no architecture definition for {plan.model_type!r}, so it cannot slice "
                        "this model; use `shortllm prune` / shortllm.export (drop --mergekit)")
    kinds: dict[int, list[str]] = {}
    for k, b in plan.removed_branches:
        kinds.setdefault(b, []).append(k)
    filters = branch_filters(plan.model_type) if kinds else {}
    runs: list[tuple[int, int, list[str]]] = []
    for i in plan.kept:
        k = sorted(kinds.get(i, []))
        if runs and runs[-1][1] == i and not k and not runs[-1][2]:
            runs[-1] = (runs[-1][0], i + 1, [])
        else:
            runs.append((i, i + 1, k))
    lines = [
        f"# mergekit passthrough config written by shortllm: removes blocks {plan.removed} "
        f"(0-based) of {plan.num_layers}",
        "# layer_range is [start, end): 0-based, end-exclusive.",
        f"# metric: {plan.metric}; params {plan.params_before} -> {plan.params_after}",
    ]
    if plan.model_type in PER_LAYER_LIST_TYPES:
        lines.append(f"# WARNING: mergekit 0.1.x does not rewrite layer_types, so it fails (or, with the list fixed "
                     f"by hand, silently changes logits) on {plan.model_type}; use `shortllm prune`/shortllm.export.")
    renumbered = any(new != old for old, new in plan.new_index.items())
    if renumbered and _inverse_layer_idx_scaling(plan, config):
        msg = ("GPT-2 with scale_attn_by_inverse_layer_idx scales attention by 1/(layer_idx+1); mergekit keeps the "
               "weights of renumbered blocks as they were, so their attention scale changes and the model differs "
               "from shortllm's (which folds the scale into the query weights); use `shortllm prune`/export")
        warnings.warn(msg, MergekitWarning, stacklevel=2)
        lines.append(f"# WARNING: {msg}")
    lines.append("slices:")
    for start, end, br in runs:
        lines += ["  - sources:", f"      - model: {json.dumps(str(model_name_or_path))}",
                  f"        layer_range: [{start}, {end}]"]
        if br:
            lines += ["        parameters:", "          scale:"]
            for kind in br:
                lines.append(f"            - filter: {json.dumps(filters[kind])}")
                lines.append("              value: 0.0")
            lines.append("            - value: 1.0")
    lines.append("merge_method: passthrough")
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"
