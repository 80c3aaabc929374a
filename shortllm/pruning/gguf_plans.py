"""Plans for GGUF files: choose a plan the format can express, and apply a plan to a GGUF file.

`make_gguf_plan` is `make_plan` restricted to removals that GGUF readers can express (for Gemma-2/3 the
kept blocks must keep the fixed sliding/global period at their new positions; see
`shortllm.io.gguf_files`): it makes the usual plan, and when that plan breaks the period, removes the same
number of blocks with the lowest total score among those that keep it. For other architectures it is
`make_plan` itself. `prune_gguf_file` applies any Plan to a GGUF file, byte for byte.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from shortllm.errors import PlanError
from shortllm.io.gguf_files import best_expressible_blocks, gguf_arch_for, layout_problem, plan_metadata, prune_gguf
from shortllm.pruning.plans import Plan, make_plan
from shortllm.scoring.scores import Scores


def make_gguf_plan(scores: Scores, metric: str, *, model: nn.Module, remove: Optional[int] = None,
                   ratio: Optional[float] = None, protect: Optional[Sequence[int]] = None,
                   arch: Optional[str] = None) -> Plan:
    """Like ``make_plan(scores, metric, model=..., remove=|ratio=)`` but only plans a GGUF file can express."""
    plan = make_plan(scores, metric, model=model, remove=remove, ratio=ratio, protect=protect)
    arch = arch or gguf_arch_for(getattr(model.config, "model_type", ""))
    if layout_problem(arch, plan.num_layers, plan.removed) is None:
        return plan
    first, last = plan.protect
    values = [float(v) for v in scores.per_block(metric).tolist()]
    blocks = best_expressible_blocks(values, arch, len(plan.removed), allowed=range(first, plan.num_layers - last))
    out = make_plan(scores, metric, model=model, blocks=blocks, protect=plan.protect)
    out.mode, out.ratio = f"{plan.mode}+gguf_expressible", plan.ratio
    return out


def prune_gguf_file(src: str | os.PathLike, plan: Plan, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write GGUF ``src`` without ``plan.removed`` to ``dst`` (tensors copied byte for byte, metadata rewritten;
    PlanError, nothing written, when the file does not match the plan or cannot express it)."""
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a Plan, got {type(plan).__name__}; make one with make_plan / Plan.load")
    return prune_gguf(src, dst, plan.removed, num_layers=plan.num_layers, model_type=plan.model_type,
                      removed_branches=plan.removed_branches, overwrite=overwrite,
                      extra_metadata=plan_metadata(plan.to_dict()))
