"""Per-expert statistics of mixture-of-experts blocks, collected in the scoring pass (REAP, Lasby et al. 2025).

For every routed expert j of every MoE block, over the valid calibration tokens routed to it:

    count_j     = |X_j|                                  (tokens that picked expert j among their top-k)
    reap_sum_j  = sum_{x in X_j} g_j(x) * ||f_j(x)||_2    (router weight times expert output norm)
    norm_sum_j  = sum_{x in X_j} ||f_j(x)||_2
    reap_mean_j = reap_sum_j / count_j                   (REAP's saliency; NaN for an expert never picked)

g_j(x) is the weight the model itself applies to expert j's output (after its own top-k renormalisation or
scaling) and f_j(x) the expert's output before that weight. Both come from the routed-experts module's call
(`shortllm.model.discovery.expert_modules`: forward(hidden_states, expert indices, routing weights)): a
forward pre-hook sees the router's selection and, without gradients, re-runs the same module once per expert
on that expert's tokens with weight 1 (so fused 3-D experts and any `experts_implementation` are measured by
the model's own code, never re-implemented here). The extra cost is one more expert pass (k experts per token).

Only the scorer's real forward counts: the hooks are armed from `begin_batch` (collectors after the PPL
collector's capture pass) until the last block has run, and only while the expert's own block is inside its
`__call__` — PPL's suffix replays and gradient-checkpoint recomputation call `block.forward` directly.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from shortllm.model.discovery import expert_modules
from shortllm.scoring.collectors import Collector
from shortllm.scoring.context import BatchContext, RunContext

FIELDS = ("count", "reap_sum", "norm_sum")
PREFIX = "experts."  # result keys "experts.count" ... ([L, E_max], NaN where a layer has no such expert)


def _bind(mod: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(hidden [N, D], indices [N, k], weights [N, k]) of a routed-experts call, or None when the call is not one."""
    try:
        bound = inspect.signature(mod.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    vals = list(bound.arguments.values())[:3]
    if len(vals) < 3 or not all(isinstance(v, Tensor) for v in vals):
        return None
    h, idx, w = vals
    if (h.dim() != 2 or idx.dim() != 2 or idx.shape != w.shape or idx.shape[0] != h.shape[0]
            or idx.is_floating_point() or not w.is_floating_point()):
        return None
    return h, idx, w


class ExpertCollector(Collector):
    """Per-expert usage and REAP saliency of every routed-experts module (one per MoE block)."""

    metrics = ()

    def __init__(self, num_layers: int, device: torch.device):
        self.L, self.device = num_layers, device
        self.found: dict[int, tuple[str, int]] = {}  # layer -> (path in the block, number of experts)
        self.acc = torch.zeros(0)
        self.handles = []
        self.armed = False
        self.inside: Optional[int] = None  # the block whose __call__ is running
        self.valid: Optional[Tensor] = None

    def start(self, run: RunContext) -> None:
        blocks = run.adapter.blocks()
        for i, blk in enumerate(blocks):
            mods = expert_modules(blk)
            if mods:
                self.found[i] = mods[0]
        e_max = max((e for _, e in self.found.values()), default=0)
        self.acc = torch.zeros(self.L, e_max, len(FIELDS), dtype=torch.float64, device=self.device)
        if not self.found:
            return
        for i, blk in enumerate(blocks):
            self.handles.append(blk.register_forward_pre_hook(functools.partial(self._enter, i)))
            self.handles.append(blk.register_forward_hook(functools.partial(self._leave, i)))
        for i, (path, _) in self.found.items():
            mod = blocks[i].get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(functools.partial(self._experts, i), with_kwargs=True))

    def _enter(self, i: int, _mod, _args) -> None:
        self.inside = i

    def _leave(self, i: int, _mod, _args, _out) -> None:
        self.inside = None
        if i == self.L - 1:
            self.armed = False  # the forward is over: anything later is a recomputation or a replay

    def begin_batch(self, ctx: BatchContext) -> None:
        self.armed, self.valid = True, ctx.valid

    def end_batch(self, ctx: BatchContext) -> None:
        self.armed, self.valid = False, None

    def _experts(self, i: int, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.armed or self.inside != i:
            return
        call = _bind(mod, args, kwargs)
        if call is None:
            return
        h, idx, w = call
        n_exp = self.found[i][1]
        rows = self.valid is not None and self.valid.numel() == h.shape[0]
        keep = self.valid.to(idx.device)[:, None] if rows else torch.ones_like(idx[:, :1], dtype=torch.bool)
        stats = torch.zeros(n_exp, len(FIELDS), dtype=torch.float64, device=h.device)
        with torch.no_grad():
            h = h.detach()
            for e in range(n_exp):
                tok, slot = torch.where((idx == e) & keep)
                if tok.numel() == 0:
                    continue
                sel = torch.full((tok.numel(), 1), e, dtype=idx.dtype, device=idx.device)
                out = mod.forward(h[tok], sel, torch.ones((tok.numel(), 1), dtype=w.dtype, device=w.device))
                norm = out.double().norm(dim=-1)
                stats[e, 0] = tok.numel()
                stats[e, 1] = (w.detach()[tok, slot].double() * norm).sum()
                stats[e, 2] = norm.sum()
        self.acc[i, :n_exp] += stats.to(self.acc.device)

    def finish(self) -> dict[str, Tensor]:
        if not self.found:
            return {}
        out = torch.full_like(self.acc, float("nan")).cpu()
        for i, (_, n_exp) in self.found.items():
            out[i, :n_exp] = self.acc[i, :n_exp].cpu()
        return {PREFIX + f: out[:, :, j].clone() for j, f in enumerate(FIELDS)}

    def accumulators(self) -> list[Tensor]:
        return [self.acc] if self.found else []

    def close(self) -> None:
        for hdl in self.handles:
            hdl.remove()
        self.handles.clear()
        self.armed, self.inside, self.valid = False, None, None


def split_expert_results(results: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """(per-block metric values, {layer: {"count", "reap_sum", "norm_sum", "reap_mean": float64 [E]}})."""
    values = {k: v for k, v in results.items() if not k.startswith(PREFIX)}
    if PREFIX + "count" not in results:
        return values, {}
    fields = {f: results[PREFIX + f].to(torch.float64).cpu() for f in FIELDS}
    experts: dict[int, dict[str, Tensor]] = {}
    for i in range(fields["count"].shape[0]):
        present = ~torch.isnan(fields["count"][i])
        if not bool(present.any()):
            continue
        layer = {f: t[i][present].clone() for f, t in fields.items()}
        layer["reap_mean"] = layer["reap_sum"] / layer["count"]  # 0/0 = NaN: an expert no token picked
        experts[i] = layer
    return values, experts
