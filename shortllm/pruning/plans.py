"""Pruning plans: which decoder blocks (and which attention / MLP branches) to remove, as a JSON file.

Block indices are 0-based positions in the ORIGINAL model. A contiguous span (l, n) removes blocks
l .. l+n-1 (end-exclusive, SPEC §2). Lower score = less important = removed first, for every metric.

`ratio=r` is a fraction of the model's PARAMETERS (as in the papers' "20% / 35%"), not of blocks: the
number of blocks is the one whose removal (in ranking order) brings the removed share of parameters
closest to r (ties: fewer blocks). Parameters are counted once even when tied (embeddings / LM head).
A removed branch counts as all of its parameters gone (that is what the fused model computes), although
the plain-transformers checkpoint still stores its zeroed weights.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from shortllm.errors import PlanError
from shortllm.io.atomic import atomic_write_text
from shortllm.model.fingerprint import structure_fingerprint, weights_fingerprint
from shortllm.pruning.selection import adjacent_pairs, best_span, branch_selection, check_ratio_reachable, non_adjacent
from shortllm.pruning.sizes import blocks_for_ratio, count_params
from shortllm.scoring.scores import Scores

FORMAT = "shortllm.plan/1"
PROTECTED_METRICS = ("taylor", "mag")  # SPEC "+" rule: Taylor+ and Mag+
DEFAULT_PROTECT = (4, 2)
BRANCHES = ("attn", "mlp")
BRANCH_METRICS = {"bi_attn": "attn", "bi_mlp": "mlp"}  # metric -> the branch kind its plans remove


def scores_fingerprint(scores: Scores) -> str:
    """Content hash of a Scores object (values and the model fingerprint it was computed on)."""
    payload = json.dumps({"values": scores.to_dict()["values"], "model": scores.meta.get("fingerprint")},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class Plan:
    """What to remove from one model. `removed`/`kept` are block indices of the original model;
    `removed_branches` are (kind, block) pairs, kind in {"attn", "mlp"}, of blocks that are kept."""

    num_layers: int
    removed: list[int]
    removed_branches: list[tuple[str, int]] = field(default_factory=list)
    metric: Optional[str] = None
    mode: str = "blocks"
    protect: tuple[int, int] = (0, 0)
    ratio: Optional[float] = None
    params_before: int = 0
    params_after: int = 0
    model_type: str = ""
    model_name: str = ""
    model_fingerprint: str = ""
    structure_fingerprint: str = ""
    scores_fingerprint: Optional[str] = None
    scores_meta: dict = field(default_factory=dict)
    created: str = ""
    budget: dict = field(default_factory=dict)  # Budget targets and predicted figures (shortllm.pruning.budget)
    no_adjacent: bool = False

    def __post_init__(self):
        self.removed = sorted(int(i) for i in self.removed)
        self.removed_branches = sorted((str(k), int(b)) for k, b in self.removed_branches)
        self.protect = (int(self.protect[0]), int(self.protect[1]))
        _validate(self.num_layers, self.removed, self.removed_branches)
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [i for i in range(self.num_layers) if i not in gone]

    @property
    def new_index(self) -> dict[int, int]:
        """Original block index -> index in the pruned model (kept blocks only)."""
        return {old: new for new, old in enumerate(self.kept)}

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    # ---- model check ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module, check_weights: bool = True) -> None:
        """PlanError unless `model` is the (unpruned) model this plan was made for."""
        from shortllm.model.adapters import get_adapter

        n = get_adapter(model).num_layers
        mt = getattr(model.config, "model_type", "")
        if n != self.num_layers or (self.model_type and mt != self.model_type):
            raise PlanError(f"this plan is for a {self.model_type or '?'} model of {self.num_layers} blocks "
                            f"({self.model_name}), but the model is a {mt} of {n} blocks; make a plan for this model "
                            "(shortllm.make_plan on its own scores), or load the model the plan was made for")
        if self.structure_fingerprint and structure_fingerprint(model) != self.structure_fingerprint:
            raise PlanError(f"this plan is for a model with other parameter names/shapes ({self.model_name}); "
                            "make a plan for this model")
        if check_weights and self.model_fingerprint and weights_fingerprint(model) != self.model_fingerprint:
            raise PlanError(f"this plan was made on other weights than this model's ({self.model_name}, fingerprint "
                            f"{self.model_fingerprint}); make a plan for this model, or pass check_weights=False if "
                            "it is the same model in another dtype/device")

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed_branches"] = [list(x) for x in self.removed_branches]
        d["protect"] = list(self.protect)
        d["kept"] = self.kept
        d["removed_fraction"] = self.removed_fraction
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("format") != FORMAT:
            raise PlanError(f"not a shortllm plan (format {d.get('format')!r}, expected {FORMAT!r}); "
                            "create one with shortllm.make_plan(...).save(path)")
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["removed_branches"] = [tuple(x) for x in kw.get("removed_branches", [])]
        kw["protect"] = tuple(kw.get("protect", (0, 0)))
        plan = cls(**kw)
        if "kept" in d and list(d["kept"]) != plan.kept:
            raise PlanError(f"corrupted plan: 'kept' {d['kept']} does not complement 'removed' {plan.removed}")
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Optional[nn.Module] = None, check_weights: bool = True) -> "Plan":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; "
                            "create it with shortllm.make_plan(...).save(path)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path} is not valid JSON ({exc}); re-create the plan") from None
        try:
            plan = cls.from_dict(d)
        except TypeError as exc:
            raise PlanError(f"{path} is not a valid shortllm plan ({exc}); re-create it") from None
        if model is not None:
            plan.check_model(model, check_weights=check_weights)
        return plan


def _validate(num_layers: int, removed: Sequence[int], branches: Sequence[tuple[str, int]]) -> None:
    if num_layers < 1:
        raise PlanError(f"num_layers must be >= 1, got {num_layers}")
    bad = [i for i in removed if not 0 <= i < num_layers]
    if bad:
        raise PlanError(f"block indices {bad} are out of range for a model of {num_layers} blocks (0-based)")
    if len(set(removed)) != len(removed):
        raise PlanError(f"duplicate block indices in {list(removed)}")
    if len(removed) >= num_layers:
        raise PlanError(f"the plan removes all {num_layers} blocks; a model needs at least one block: remove fewer")
    for kind, b in branches:
        if kind not in BRANCHES:
            raise PlanError(f"branch kind must be one of {BRANCHES}, got {kind!r}")
        if not 0 <= b < num_layers:
            raise PlanError(f"branch ({kind!r}, {b}) is out of range for a model of {num_layers} blocks")
        if b in removed:
            raise PlanError(f"branch ({kind!r}, {b}) belongs to block {b}, which the plan removes whole; "
                            "list the block or its branches, not both")
    if len(set(branches)) != len(branches):
        raise PlanError(f"duplicate branches in {list(branches)}")
    if not removed and not branches:
        raise PlanError("the plan removes nothing; "
                        "ask for remove=K >= 1, a ratio in (0, 1), or a non-empty blocks list")


def _params_after(adapter, removed: Sequence[int], branches: Sequence[tuple[str, int]]) -> tuple[int, int]:
    blocks = adapter.blocks()
    total = count_params(adapter.model)
    gone = count_params([blocks[i] for i in removed])
    gone += sum(count_params(adapter.branch(blocks[b], k)) for k, b in branches)
    return total, total - gone


def _protect_for(metric: Optional[str], protect: Optional[Sequence[int]], num_layers: int) -> tuple[int, int]:
    if protect is None:
        protect = DEFAULT_PROTECT if metric in PROTECTED_METRICS else (0, 0)
    first, last = int(protect[0]), int(protect[1])
    if first < 0 or last < 0:
        raise PlanError(f"protect=(first, last) must be non-negative, got {(first, last)}")
    if first + last >= num_layers:
        raise PlanError(f"protect=({first}, {last}) covers all {num_layers} blocks (the protected ranges overlap or "
                        "leave nothing removable); protect fewer blocks, e.g. protect=(0, 0)")
    return first, last


def make_plan(scores: Optional[Scores], metric: Optional[str] = None, *, model: nn.Module,
              remove: Optional[int] = None, ratio: Optional[float] = None, blocks: Optional[Sequence[int]] = None,
              branches: Optional[Sequence[tuple[str, int]]] = None, protect: Optional[Sequence[int]] = None,
              span: bool = False, no_adjacent: bool = False, budget=None) -> Plan:
    """Choose what to remove from `model` (whose `scores` these are) by `metric`.

    Exactly one of: `remove=K` blocks, `ratio=r` of the parameters, an explicit `blocks=[...]` list, or
    `branches=[("attn", i), ("mlp", j), ...]` (sub-block plan, e.g. from shortllm.scoring.search; may be combined
    with `blocks`). `protect=(first, last)` blocks are never removed (default (4, 2) for taylor/mag, else
    (0, 0)). `span=True` removes the contiguous span l .. l+n-1 with the lowest angular distance d(l, n)
    (needs the "angular" matrix; n from `remove`, or from `ratio`). Over-asking raises PlanError.
    `budget=Budget(params=, memory_gb=, latency_ms=, ...)` instead picks the least important blocks (or, for
    bi_attn / bi_mlp, branches) by `metric` that meet every target: see shortllm.pruning.budget.

    Metrics "bi_attn" / "bi_mlp" make branch plans: `remove=K` removes the K attention (MLP) branches with the
    lowest scores, `ratio=r` as many as bring the removed parameters closest to r; their blocks stay. Metric
    "tail" (the reverse-order baseline) needs no scores: `make_plan(None, "tail", model=m, remove=K)` drops the
    last K removable blocks. `no_adjacent=True` never removes two neighbouring blocks (or, for branch plans,
    branches of neighbouring blocks): blocks are taken in ranking order, skipping a neighbour of one already
    taken and any pick that would leave too few non-adjacent places for the rest; PlanError when `remove=K`
    (or `ratio`) cannot be met without neighbours.
    """
    if budget is not None:
        from shortllm.pruning.budget import plan_with_budget

        if any(x is not None for x in (remove, ratio, blocks, branches)) or span or no_adjacent:
            raise PlanError("budget= chooses what to remove: do not also give remove=, ratio=, blocks=, branches=, "
                            "span= or no_adjacent=")
        return plan_with_budget(make_plan, scores, metric, model=model, budget=budget, protect=protect)
    from shortllm.model.adapters import get_adapter

    adapter = get_adapter(model)
    L = adapter.num_layers
    if scores is None and metric == "tail" and (remove is not None or ratio is not None):
        from shortllm.scoring.engine import score_fast

        scores = score_fast(model, [], metrics=("tail",), progress=False)
    if scores is not None:
        if scores.num_layers != L:
            raise PlanError(f"scores are for a model of {scores.num_layers} blocks but this model has {L}; "
                            "score this model first (`shortllm score`)")
        if scores.meta.get("fingerprint") and scores.meta["fingerprint"] != weights_fingerprint(model):
            raise PlanError(f"scores were computed on other weights ({scores.meta.get('model_name')}) than this "
                            "model; re-score this model")
    if span and metric is None:
        metric = "angular"
    asked = [x is not None for x in (remove, ratio, blocks)]
    if sum(asked) > 1:
        raise PlanError("give only one of remove=K, ratio=r or blocks=[...]")
    if sum(asked) == 0 and not branches:
        raise PlanError("say what to remove: "
                        "remove=K blocks, ratio=r of the parameters, blocks=[...] or branches=[...]")
    if no_adjacent and span:
        raise PlanError("no_adjacent=True does not apply to span=True (a span is contiguous by definition); drop one")
    if no_adjacent and (blocks is not None or branches) and remove is None and ratio is None:
        adjacent = adjacent_pairs(list(blocks or []) + [b for _, b in (branches or [])])
        if adjacent:
            raise PlanError(f"no_adjacent=True but the given blocks/branches include neighbours {adjacent}; "
                            "drop one of each pair or pass no_adjacent=False")
    first, last = _protect_for(metric if blocks is None else None, protect, L)
    removable = L - first - last
    blocks_mod = adapter.blocks()
    block_params = [count_params(b) for b in blocks_mod]
    total = count_params(model)
    if ratio is not None and not 0.0 < float(ratio) < 1.0:
        raise PlanError(f"ratio={ratio} must be in (0, 1): a fraction of the model's parameters, e.g. 0.2")
    if remove is not None and (not isinstance(remove, int) or remove < 1):
        raise PlanError(f"remove={remove!r} must be an integer >= 1 (an empty plan prunes nothing)")
    if remove is not None and remove >= L and metric not in BRANCH_METRICS:
        raise PlanError(f"remove={remove} would delete all {L} blocks; remove at most {L - 1}")

    mode, removed = "blocks", []
    if blocks is not None:
        removed = sorted(int(b) for b in blocks)
        _validate(L, removed, []) if removed else None
        hit = [b for b in removed if b < first or b >= L - last]
        if hit:
            raise PlanError(f"blocks {hit} are protected by protect=({first}, {last}); drop them or lower protect")
    elif remove is not None or ratio is not None:
        if scores is None or metric is None:
            raise PlanError("remove=/ratio= pick blocks by score: pass scores and metric (or give blocks=[...])")
        if metric in BRANCH_METRICS:
            if span or branches:
                raise PlanError(f"metric {metric!r} makes a branch plan; it does not combine with span=True or an "
                                "explicit branches=[...] list")
            kind = BRANCH_METRICS[metric]
            branches = branch_selection(scores, metric, kind, adapter, remove, ratio, first, last, L, total,
                                         no_adjacent)
            mode = "remove" if remove is not None else "ratio"
        elif span:
            mode = "span"
            removed = best_span(scores, remove, ratio, first, last, L, block_params, total)
        else:
            mode = "remove" if remove is not None else "ratio"
            ranking = scores.ranking(metric)
            order = [i for i in ranking if first <= i < L - last]
            if ratio is not None:
                check_ratio_reachable(float(ratio), ranking, order, block_params, total, first, last, L)
            if no_adjacent:
                removed = non_adjacent(order, remove, ratio, block_params, total, first, last, L, "blocks")
            else:
                k = remove if remove is not None else blocks_for_ratio(float(ratio), order, block_params, total)
                if k > removable:
                    raise PlanError(f"cannot remove {k} blocks: with protect=({first}, {last}) only {removable} of "
                                    f"{L} blocks are removable; ask for fewer or lower protect")
                removed = sorted(order[:k])
    branches = [(str(k), int(b)) for k, b in (branches or [])]
    both = sorted({b for k, b in branches if k == "attn"} & {b for k, b in branches if k == "mlp"})
    if both:  # a block without both branches is the identity: remove it whole (identical output, less compute)
        removed = sorted(set(removed) | set(both))
        branches = [(k, b) for k, b in branches if b not in both]
    _validate(L, removed, branches)
    before, after = _params_after(adapter, removed, branches)
    return Plan(num_layers=L, removed=removed, removed_branches=list(branches or []), metric=metric, mode=mode,
                protect=(first, last), ratio=None if ratio is None else float(ratio), params_before=before,
                params_after=after, model_type=getattr(model.config, "model_type", ""),
                model_name=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
                model_fingerprint=weights_fingerprint(model), structure_fingerprint=structure_fingerprint(model),
                scores_fingerprint=scores_fingerprint(scores) if scores is not None else None,
                scores_meta=_scores_provenance(scores), no_adjacent=bool(no_adjacent))


def plan_from_search(result, model: nn.Module, scores: Optional[Scores] = None) -> Plan:
    """A Plan from a `shortllm.scoring.search` result: ("block", i) entries become removed blocks, ("attn", i) /
    ("mlp", i) removed branches (a block that loses both branches is removed whole)."""
    pairs = list(result.plan)
    blocks = [b for k, b in pairs if k == "block"]
    branches = [(k, b) for k, b in pairs if k != "block"]
    plan = make_plan(scores, None, model=model, blocks=blocks, branches=branches)
    plan.metric = f"ppl-{getattr(result, 'method', 'search')}"
    plan.mode = "search"
    return plan


def _scores_provenance(scores: Optional[Scores]) -> dict:
    if scores is None:
        return {}
    keep = ("model_name", "model_type", "num_layers", "fingerprint", "data", "data_fingerprint", "n_tokens",
            "options", "versions", "created")
    return {k: scores.meta.get(k) for k in keep if k in scores.meta}
