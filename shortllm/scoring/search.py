"""PPL-driven greedy searches in one resident model (SPEC §2 "Iterative", "Sub-block").

- `iterative` (SLEB): each round scores every remaining candidate block by the calibration PPL of the
  model with the removals so far plus that block removed, and removes the argmin.
- `subblock` (BlockPruner): the candidates are every block's attention branch and MLP branch;
  removing a branch makes its residual contribution zero (a forward hook returning zeros); greedy by PPL.

Both reuse prefixes: one walk through the kept blocks per batch and round, and for each candidate at
block i only blocks i..L-1 are re-run (with their own captured calls, `shortllm.model.replay`). Ties go to the
lower block index (and "attn" before "mlp" in the same block).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortllm.errors import EmptyLoaderError, PlanError
from shortllm.model.adapters import Adapter, get_adapter
from shortllm.model.replay import BRANCH_KINDS, capture_calls, run_blocks, zeroed_branches
from shortllm.scoring.ppl import HeadLoss

Candidate = tuple[str, int]  # ("block" | "attn" | "mlp", block index)
FORMAT = "shortllm.search/1"


@dataclass
class SearchResult:
    """Removal order and the calibration PPL after each step.

    `order`: block indices (iterative) or (kind, block) pairs (subblock), in removal order.
    `candidate_ppl[r]`: every candidate's PPL in round r, keyed "3" (iterative) or "attn:3" (subblock).
    """

    method: str
    num_layers: int
    order: list
    ppl_after_each_step: list[float]
    base_ppl: float
    candidate_ppl: list[dict[str, float]]
    n_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def removed(self) -> list:
        return sorted(self.order)

    @property
    def plan(self) -> list[Candidate]:
        """(kind, block) pairs in removal order; whole blocks are ("block", i)."""
        return [("block", int(x)) if isinstance(x, int) else (str(x[0]), int(x[1])) for x in self.order]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method, "num_layers": self.num_layers,
                "order": [x if isinstance(x, int) else list(x) for x in self.order],
                "plan": [{"kind": k, "block": b} for k, b in self.plan],
                "removed_blocks": sorted(b for k, b in self.plan if k == "block"),
                "ppl_after_each_step": self.ppl_after_each_step, "base_ppl": self.base_ppl,
                "candidate_ppl": self.candidate_ppl, "n_tokens": self.n_tokens, "meta": self.meta}

    def save(self, path: Union[str, os.PathLike]) -> None:
        from shortllm.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


def candidate_label(c: Candidate) -> str:
    return str(c[1]) if c[0] == "block" else f"{c[0]}:{c[1]}"


def candidate_nll(model: nn.Module, adapter: Adapter, batches: Sequence[dict], *, removed_blocks: Iterable[int] = (),
                  removed_branches: Iterable[Candidate] = (), candidates: Sequence[Candidate] = (),
                  want_base: bool = False, progress: bool = False, desc: str = "",
                  head: str = "auto") -> tuple[Tensor, float, int]:
    """Summed token NLL (float64) of every candidate removal on top of the current removals.

    Returns (nll [len(candidates)], base_nll (of the current model; NaN unless `want_base`), n_tokens).
    `head`: "auto", "op" (shortllm.ops.lm_head_nll) or "torch" (row-chunked F.cross_entropy), see
    `shortllm.scoring.ppl.HeadLoss`.
    """
    blocks = adapter.blocks()
    L = len(blocks)
    removed_blocks = set(removed_blocks)
    live = [j for j in range(L) if j not in removed_blocks]
    at: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ci, (kind, i) in enumerate(candidates):
        at[i].append((ci, kind))
    stop = len(live) if want_base else max([live.index(i) + 1 for i in at] + [0])
    nll = torch.zeros(len(candidates), dtype=torch.float64)
    base, count = 0.0, 0
    device = next(model.parameters()).device
    bar = tqdm(total=len(batches) * stop, desc=desc or "ppl search: block", unit="block", disable=not progress,
               leave=False)
    with torch.no_grad(), zeroed_branches(adapter, removed_branches):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = mask.to(device) if mask is not None else None
            h, calls = capture_calls(model, adapter, ids, mask)
            loss = HeadLoss(adapter, ids, mask, head)
            for pos in range(stop):
                i = live[pos]
                for ci, kind in at.get(i, ()):
                    if kind == "block":
                        x = h
                    else:
                        with zeroed_branches(adapter, [(kind, i)]):
                            x = calls[i].run(blocks[i], h)
                    x = run_blocks(blocks, calls, x, live[pos + 1:])
                    nll[ci] += loss.nll_sum(x)
                if want_base or pos < stop - 1:  # no later candidate needs the walk past the last one
                    h = calls[i].run(blocks[i], h)
                bar.update(1)
            if want_base:
                base += loss.nll_sum(h)
            count += loss.n_tokens
            del h, calls
    bar.close()
    if count == 0:
        raise EmptyLoaderError("no calibration position has a valid next token; use sequences of >= 2 valid tokens")
    return nll, (base if want_base else float("nan")), count


class _Batches(list):
    """The calibration batches, materialised once (every round walks them again), with their description."""

    def __init__(self, data: Iterable[dict]):
        super().__init__(data)
        self.description = getattr(data, "description", None)


def _protected(L: int, protect: Sequence[int], keep: Iterable[int]) -> set[int]:
    if len(protect) != 2 or any(int(x) < 0 for x in protect):
        raise PlanError(f"protect must be (first k, last m) with k, m >= 0, got {tuple(protect)!r}")
    k, m = int(protect[0]), int(protect[1])
    bad = [i for i in keep if not 0 <= int(i) < L]
    if bad:
        raise PlanError(f"keep block indices {bad} are outside 0..{L - 1}")
    return set(range(min(k, L))) | set(range(max(0, L - m), L)) | {int(i) for i in keep}


def _prepare(model: nn.Module, data: Iterable[dict], adapter: Optional[Adapter]) -> tuple[Adapter, list[dict]]:
    adapter = adapter or get_adapter(model)
    batches = _Batches(data)
    if not batches:
        raise EmptyLoaderError("the calibration loader yielded no batch; give it at least one text "
                               "(e.g. calibration_loader('wikitext2', tokenizer, n_samples=10))")
    return adapter, batches


def _greedy(model, adapter, batches, method: str, pool: list[Candidate], n_remove: int, progress: bool,
            head: str) -> SearchResult:
    was_training = model.training
    model.eval()
    try:
        order: list[Candidate] = []
        steps, rounds = [], []
        base_ppl = float("nan")
        rbar = tqdm(range(n_remove), desc=f"{method} search: round", unit="round", disable=not progress)
        for r in rbar:
            cands = [c for c in pool if c not in order]
            nll, base, count = candidate_nll(
                model, adapter, batches, removed_blocks=[b for k, b in order if k == "block"],
                removed_branches=[c for c in order if c[0] != "block"], candidates=cands, want_base=(r == 0),
                progress=progress, desc=f"round {r + 1}/{n_remove}: block", head=head)
            if r == 0:
                base_ppl = math.exp(base / count)
            ppl = torch.exp(nll / count)
            best = int(torch.argmin(torch.where(torch.isnan(ppl), torch.inf, ppl)))  # first minimum on ties
            order.append(cands[best])
            steps.append(float(ppl[best]))
            rounds.append({candidate_label(c): float(p) for c, p in zip(cands, ppl.tolist())})
            rbar.set_postfix(removed=candidate_label(cands[best]), ppl=f"{float(ppl[best]):.3f}")
    finally:
        model.train(was_training)
    shown = [b for _, b in order] if method == "iterative" else order
    return SearchResult(method=method, num_layers=adapter.num_layers, order=shown, ppl_after_each_step=steps,
                        base_ppl=base_ppl, candidate_ppl=rounds, n_tokens=count,
                        meta={"model_type": getattr(model.config, "model_type", ""),
                              "data": getattr(batches, "description", None)})


def iterative(model: nn.Module, data: Iterable[dict], n_remove: int, protect: Sequence[int] = (0, 0), *,
              keep: Iterable[int] = (), adapter: Optional[Adapter] = None, progress: bool = True,
              head: str = "auto") -> SearchResult:
    """SLEB: remove `n_remove` blocks one at a time, each the argmin-PPL block given the removals so far.

    protect=(k, m): the first k and last m blocks are never removed; `keep`: more block indices never removed.
    Raises PlanError when fewer than `n_remove` candidates exist (or nothing would be left).
    """
    adapter, batches = _prepare(model, data, adapter)
    L = adapter.num_layers
    prot = _protected(L, protect, keep)
    pool = [("block", i) for i in range(L) if i not in prot]
    if not pool:
        raise PlanError(f"protect={tuple(protect)} keep={sorted(set(keep))} protects all {L} blocks: nothing is left "
                        "to remove; lower the protected counts")
    limit = min(len(pool), L - 1)
    if not isinstance(n_remove, int) or n_remove < 1 or n_remove > limit:
        raise PlanError(f"cannot remove {n_remove!r} of {L} blocks with {len(prot)} protected: choose 1..{limit} "
                        "(at least one block must remain), or protect fewer blocks")
    return _greedy(model, adapter, batches, "iterative", pool, n_remove, progress, head)


def subblock(model: nn.Module, data: Iterable[dict], n_remove: int, protect: Sequence[int] = (0, 0), *,
             keep: Iterable[int] = (), adapter: Optional[Adapter] = None, progress: bool = True,
             head: str = "auto") -> SearchResult:
    """BlockPruner: remove `n_remove` attention/MLP branches greedily by PPL; `result.plan` lists the
    (kind, block) pairs in removal order. Protection as in `iterative` (covers both branches of a block)."""
    adapter, batches = _prepare(model, data, adapter)
    L = adapter.num_layers
    prot = _protected(L, protect, keep)
    pool = [(kind, i) for i in range(L) if i not in prot for kind in BRANCH_KINDS]
    if not pool:
        raise PlanError(f"protect={tuple(protect)} keep={sorted(set(keep))} protects all {L} blocks: no branch is "
                        "left to remove; lower the protected counts")
    limit = min(len(pool), 2 * L - 1)
    if not isinstance(n_remove, int) or n_remove < 1 or n_remove > limit:
        raise PlanError(f"cannot remove {n_remove!r} branches: {len(pool)} attention/MLP branches are candidates "
                        f"(and at least one of the {2 * L} must remain); choose 1..{limit}")
    return _greedy(model, adapter, batches, "subblock", pool, n_remove, progress, head)


def to_plan(result: SearchResult, model: nn.Module):
    """A `shortllm.pruning.plans.Plan` (what `shortllm prune` applies), the search record in
    `scores_meta["search"]`."""
    from shortllm.pruning.plans import plan_from_search

    plan = plan_from_search(result, model)
    plan.scores_meta = {**(plan.scores_meta or {}), "search": result.to_dict()}
    return plan
