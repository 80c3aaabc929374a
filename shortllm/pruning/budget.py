"""Plans that meet a budget: parameters, parameter memory and measured latency.

`make_plan(scores, metric, model=m, budget=Budget(...))` (shortllm.pruning.plans) delegates here:

- Candidates: whole blocks, ranked by a block metric; or, for the branch metrics "bi_attn" / "bi_mlp", the
  attention / MLP branches of the blocks, ranked by that metric. Protected blocks (`protect`) never are.
- Selection: greedy in metric order -- the SHORTEST prefix of the ranking (least important first) whose removal
  meets every target. Each figure falls monotonically as candidates are added, so this is the plan that
  removes the least-important candidates and no more than needed; it is not a knapsack optimum (a later,
  larger candidate could meet a target with fewer removals).
- Figures: `params` counts unique parameters (a removed branch counts as all of its parameters, as plans do);
  `memory_gb` is the parameter bytes at the model's dtype / 1e9 (decimal GB; activations and the KV cache are
  not counted); `latency_ms` is the predicted time of one forward of `batch` x `seq_len` tokens (phase
  "prefill") or of one token with a KV cache of `seq_len` (phase "decode"): the unpruned model's time minus
  the measured time of each removed candidate.
- Latency profile: one real forward with timing hooks on every block and every attention / MLP module, on the
  model's own device (synchronised on accelerators), `repeats` times after a warm-up; every figure comes from
  the fastest run (so they add up), and embeddings + head are the total minus the blocks. Profiles are cached
  as JSON under `<shortllm cache dir>/latency/`, keyed by the structure fingerprint, dtype, device (name), batch,
  seq_len and thread count. A removed branch is only skipped at inference by the fused model
  (`shortllm.fuse`); a plain checkpoint still computes its zeroed weights, so branch latency savings are
  measured on the fused model.
An unreachable budget is a PlanError naming the closest reachable figure (everything removable removed).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from shortllm.errors import PlanError
from shortllm.model.adapters import get_adapter, model_device
from shortllm.model.fingerprint import structure_fingerprint

BRANCH_METRICS = {"bi_attn": "attn", "bi_mlp": "mlp"}
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Budget:
    """Targets a plan must meet (None = no target). `batch`, `seq_len` and `phase` say what latency means."""

    params: Optional[int] = None
    memory_gb: Optional[float] = None
    latency_ms: Optional[float] = None
    batch: int = 1
    seq_len: int = 128
    phase: str = "prefill"

    def __post_init__(self):
        if self.params is None and self.memory_gb is None and self.latency_ms is None:
            raise PlanError("a Budget needs at least one target: params=, memory_gb= or latency_ms=")
        for name in ("params", "memory_gb", "latency_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise PlanError(f"Budget {name}={v!r} must be a positive number")
        if int(self.batch) < 1 or int(self.seq_len) < 1:
            raise PlanError(f"Budget batch={self.batch} and seq_len={self.seq_len} must be >= 1")
        if self.phase not in PHASES:
            raise PlanError(f"Budget phase={self.phase!r} must be one of {PHASES}")


# ---- latency profile ------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return f"{device.type}-{platform.machine()}-{platform.processor() or 'cpu'}-{os.cpu_count()}"


def _cache_file(model: nn.Module, batch: int, seq_len: int, cache_dir: Optional[str]) -> Path:
    from shortllm.model.loading import cache_root

    dev = model_device(model)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    key = (f"{structure_fingerprint(model)}-{dtype}-{_device_name(dev)}-b{batch}-t{seq_len}"
           f"-th{torch.get_num_threads()}")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return cache_root(cache_dir) / "latency" / f"{safe}.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_forward(model: nn.Module, modules: dict[str, nn.Module], run) -> dict[str, float]:
    """Seconds each named module took during `run()` (plus "total"), via pre/post forward hooks."""
    dev = model_device(model)
    starts: dict[str, float] = {}
    took: dict[str, float] = {}
    handles = []

    def pre(name, *_):
        _sync(dev)
        starts[name] = time.perf_counter()

    def post(name, *_):
        _sync(dev)
        took[name] = took.get(name, 0.0) + time.perf_counter() - starts.pop(name)

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: pre(name)))
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: post(name)))
        _sync(dev)
        t0 = time.perf_counter()
        run()
        _sync(dev)
        took["total"] = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return took


def _profile_modules(model: nn.Module) -> dict[str, nn.Module]:
    ad = get_adapter(model)
    mods: dict[str, nn.Module] = {}
    for i, blk in enumerate(ad.blocks()):
        mods[f"block.{i}"] = blk
        for kind in ("attn", "mlp"):
            m = ad.branch(blk, kind)
            if m is not None and m is not blk:
                mods[f"{kind}.{i}"] = m
    return mods


def measure_latency(model: nn.Module, batch: int = 1, seq_len: int = 128, repeats: int = 5,
                    modules: bool = True) -> dict:
    """Milliseconds (the fastest of `repeats` timed runs, after a warm-up) of one prefill ([batch, seq_len])
    and one decode step (one token after seq_len cached) of `model`: {"prefill": {"total": ms, "block.i": ms,
    "attn.i": ms, "mlp.i": ms, "other": ms}, "decode": {...}}. "other" = total - sum of blocks (embeddings,
    final norm, head, glue)."""
    dev = model_device(model)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(dev)
    nxt = torch.randint(0, vocab, (batch, 1), generator=g).to(dev)
    mods = _profile_modules(model) if modules else {}
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        def prefill():
            model(input_ids=ids, use_cache=False)

        prefill()  # warm-up
        runs = [_timed_forward(model, mods, prefill) for _ in range(repeats)]
        out["prefill"] = _fastest(runs)
        first = model(input_ids=ids, use_cache=True)
        # transformers 5.2x renamed the forward's cache argument (past_key_values -> cache): use the one it takes
        takes = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in takes else "past_key_values"
        cache = getattr(first, "cache", None)
        cache = first.past_key_values if cache is None else cache

        def decode():
            model(input_ids=nxt, use_cache=True, **{name: cache})

        decode()
        runs = [_timed_forward(model, mods, decode) for _ in range(repeats)]
        out["decode"] = _fastest(runs)
    return out


def _fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    # every figure from ONE run, the fastest: per-module medians of different runs are not additive (their sum
    # can exceed the median total), and on a shared machine interference only ever adds time
    best = min(runs, key=lambda r: r["total"])
    out = {k: 1e3 * v for k, v in best.items()}
    out["other"] = out["total"] - sum(v for k, v in out.items() if k.startswith("block."))
    return out


def latency_profile(model: nn.Module, batch: int = 1, seq_len: int = 128, *, cache_dir: Optional[str] = None,
                    repeats: int = 5, refresh: bool = False) -> dict:
    """`measure_latency` of this model, cached per structure, dtype, device, batch, length and threads."""
    from shortllm.io.atomic import atomic_write_text

    path = _cache_file(model, batch, seq_len, cache_dir)
    if path.exists() and not refresh:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["profile"]
        except (ValueError, KeyError):
            pass  # a damaged cache entry is measured again
    prof = measure_latency(model, batch, seq_len, repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": path.stem, "batch": batch, "seq_len": seq_len, "repeats": repeats,
                                        "profile": prof}, indent=1))
    return prof


# ---- selection --------------------------------------------------------------------------------------------


def _unique_params(modules: Sequence[nn.Module]) -> dict[int, tuple[int, int]]:
    seen: dict[int, tuple[int, int]] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = (p.numel(), p.numel() * p.element_size())
    return seen


@dataclass
class BudgetChoice:
    """What select_for_budget picked and the figures it predicts for the pruned model."""

    blocks: list[int]
    branches: list[tuple[str, int]]
    predicted: dict
    unpruned: dict
    targets: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        d["branches"] = [list(b) for b in self.branches]
        return d


def _figures(model_params: dict, gone: set[int], lat: Optional[dict], removed_lat: float, phase: str) -> dict:
    params = sum(n for k, (n, _) in model_params.items() if k not in gone)
    nbytes = sum(b for k, (_, b) in model_params.items() if k not in gone)
    fig = {"params": params, "memory_gb": nbytes / 1e9}
    if lat is not None:
        fig["latency_ms"] = lat[phase]["total"] - removed_lat
    return fig


def _meets(fig: dict, b: Budget) -> bool:
    return ((b.params is None or fig["params"] <= b.params) and (b.memory_gb is None or fig["memory_gb"] <= b.memory_gb)
            and (b.latency_ms is None or fig["latency_ms"] <= b.latency_ms))


def select_for_budget(scores, metric: str, model: nn.Module, budget: Budget, protect: tuple[int, int] = (0, 0), *,
                      cache_dir: Optional[str] = None, profile: Optional[dict] = None) -> BudgetChoice:
    """The shortest prefix of `metric`'s ranking (blocks, or branches for bi_attn / bi_mlp) meeting `budget`."""
    if scores is None or metric is None:
        raise PlanError("a budget picks blocks by score: pass scores and metric")
    ad = get_adapter(model)
    L = ad.num_layers
    blocks = ad.blocks()
    first, last = protect
    kind = BRANCH_METRICS.get(metric)
    order = [i for i in scores.ranking(metric) if first <= i < L - last]
    if kind is None:
        order = order[: max(0, min(len(order), L - 1))]  # a model keeps at least one block
    lat = None
    if budget.latency_ms is not None:
        lat = profile if profile is not None else latency_profile(model, budget.batch, budget.seq_len,
                                                                  cache_dir=cache_dir)
    all_params = _unique_params([model])
    phase = budget.phase
    unpruned = _figures(all_params, set(), lat, 0.0, phase)
    targets = {k: getattr(budget, k) for k in ("params", "memory_gb", "latency_ms") if getattr(budget, k) is not None}
    gone: set[int] = set()
    removed_lat = 0.0
    chosen: list[int] = []
    fig = unpruned
    if not _meets(fig, budget):
        for i in order:
            mod = blocks[i] if kind is None else ad.branch(blocks[i], kind)
            gone |= set(_unique_params([mod]))
            if lat is not None:
                removed_lat += lat[phase][f"block.{i}" if kind is None else f"{kind}.{i}"]
            chosen.append(i)
            fig = _figures(all_params, gone, lat, removed_lat, phase)
            if _meets(fig, budget):
                break
        else:
            what = "blocks" if kind is None else f"{kind} branches"
            closest = ", ".join(f"{k}={_fmt(k, fig[k])}" for k in targets)
            asked = ", ".join(f"{k}={_fmt(k, v)}" for k, v in targets.items())
            raise PlanError(f"the budget ({asked}) is unreachable: removing every removable {what} by {metric!r} "
                            f"(protect=({first}, {last})) gets to {closest} at best; ask for at least that, lower "
                            "protect, or use another metric")
    if not chosen:
        raise PlanError(f"the unpruned model already meets the budget ({_describe(unpruned)}); nothing to remove")
    return BudgetChoice(blocks=sorted(chosen) if kind is None else [],
                        branches=[] if kind is None else sorted((kind, i) for i in chosen),
                        predicted=fig, unpruned=unpruned, targets=targets)


def _fmt(key: str, v: float) -> str:
    if key == "params":
        return f"{int(v):,}"
    if key == "memory_gb":
        return f"{v:.4f} GB"
    return f"{v:.2f} ms"


def _describe(fig: dict) -> str:
    return ", ".join(f"{k}={_fmt(k, v)}" for k, v in fig.items())


def measured_figures(model: nn.Module, budget: Budget, repeats: int = 5) -> dict:
    """The figures of a pruned model, measured: params, parameter memory, and (when the budget has a latency
    target) the latency of the budget's phase. A model with dropped branches is timed through its fused copy
    when the architecture can be fused (a plain checkpoint still computes zeroed branches)."""
    fig = _figures(_unique_params([model]), set(), None, 0.0, budget.phase)
    plan = getattr(model, "shortllm_plan", None)
    if plan is not None and plan.removed_branches:
        # the parameters of a zeroed branch are still stored, but count as removed (the plans' convention)
        ad = get_adapter(model)
        blocks = ad.blocks()
        gone = set()
        for k, b in plan.removed_branches:
            gone |= set(_unique_params([ad.branch(blocks[plan.new_index[b]], k)]))
        fig = _figures(_unique_params([model]), gone, None, 0.0, budget.phase)
    if budget.latency_ms is not None:
        timed = model
        if plan is not None and plan.removed_branches:
            from shortllm.errors import UnsupportedModelError
            from shortllm.pruning.fusion import fuse

            try:
                timed = fuse(model)
            except UnsupportedModelError:
                timed = model
        prof = measure_latency(timed, budget.batch, budget.seq_len, repeats, modules=False)
        fig["latency_ms"] = prof[budget.phase]["total"]
    return fig


def plan_with_budget(make_plan, scores, metric: str, *, model: nn.Module, budget: Budget,
                     protect: Optional[Sequence[int]] = None, cache_dir: Optional[str] = None):
    """The Plan of `select_for_budget` (built by `make_plan`, passed in by shortllm.pruning.plans so this
    module does not import it). `plan.budget` holds the targets, the unpruned and the predicted figures."""
    if not isinstance(budget, Budget):
        raise PlanError(f"budget= must be a shortllm.pruning.budget.Budget, got {type(budget).__name__}")
    from shortllm.errors import MetricError

    if scores is None or metric is None:
        raise PlanError("budget= picks what to remove by score: pass scores and metric")
    if metric not in scores.values:
        raise MetricError(f"these scores have no {metric!r}; they have {scores.metrics}")
    L = get_adapter(model).num_layers
    if protect is None:
        protect = (4, 2) if metric in ("taylor", "mag") else (0, 0)  # the plans' default (SPEC "+" rule)
    first, last = int(protect[0]), int(protect[1])
    choice = select_for_budget(scores, metric, model, budget, (first, last), cache_dir=cache_dir)
    plan = make_plan(scores, metric, model=model, blocks=choice.blocks or None, branches=choice.branches or None,
                     protect=(first, last) if choice.blocks else None)
    plan.mode = "budget"
    plan.budget = {**asdict(budget), **choice.to_dict(), "num_layers": L}
    return plan
