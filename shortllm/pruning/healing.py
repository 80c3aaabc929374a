"""Training-free seam healing: fit a linear map per removed span on calibration activations and merge it
into the weights of the block before the cut, so the healed model is still a stock architecture.

Formulation (what is fitted, and where it goes). For a maximal run of removed blocks s .. e-1 (a span)
let p = s - 1 be the kept block before it ("anchor"). In the UNPRUNED model, on every valid token:

    h_p' = h_p + a + m        output of the anchor (a: its attention branch, m: its MLP branch's output, i.e.
                              the output of its MLP output projection, `down_proj` / `c_proj` / `fc2`)
    y    = h_e                the residual stream leaving the span (output of block e-1)

After pruning, block e reads h_p' instead of y. A map T applied to the WHOLE residual h_p' cannot be folded
exactly into weights (the skip term h_p + a has no weight of its own). So, as ReplaceMe does, T acts on the
MLP branch only, and the skip term is kept:

    healed anchor output = (h_p + a) + m T

which is exactly an MLP output projection W (out x in, bias b) replaced by W' = T^T W, b' = b T (GPT-2's
Conv1D stores W transposed: W' = W T). Nothing else changes: same modules, same shapes, same config, so the
checkpoint exports and reloads in plain transformers with the logits of the healed in-memory model. The
fitted target for m T is therefore r = y - (h_p' - m) (what the span added, plus the anchor's MLP output).

Methods (T = I is "no healing": the pruned model as it is):
- "lstsq":   T = argmin ||m T - r||^2 + lam ||T - I||^2 = (M^T M + lam I)^-1 (M^T R + lam I), in float64 from the
             Gram statistics M^T M, M^T R accumulated by `shortllm.ops.gram_` in one streaming pass;
             lam = ridge * tr(M^T M) / D. The ridge pulls towards the identity (no healing) rather than towards
             zero, so the fitted objective is never worse than no healing's.
- "channel": the same objective restricted to a diagonal T = diag(t) (per-channel scaling of the MLP output):
             t_j = (M^T R_jj + lam) / (M^T M_jj + lam), from the diagonals of the same statistics.
- "cosine":  ReplaceMe's cosine objective, mean over tokens of 1 - cos((h_p + a) + m T, y). It depends on every
             token's norms, not only on the Gram statistics, so the pass also keeps up to `max_rows` valid tokens
             per span (the first ones, float32) and the map is optimised on those: L-BFGS in float64 for
             `cosine_steps` iterations starting from the lstsq solution; the best of {I, lstsq, optimised} on
             that objective is kept (so it is never worse than no healing on the stored tokens).

Approximations, stated: the statistics come from the unpruned model and each span is fitted independently
(a later span's anchor sees, after pruning, the stream changed by the earlier spans); a span that starts at
block 0 has no block before it and is not healed (reported as skipped); plans that remove branches are
refused; OPT-style post-layer-norm blocks (the whole stream renormalised) are refused.

Blocks that renormalise the MLP branch before the residual add (Gemma-2/3's post_feedforward_layernorm) put a
nonlinear norm between the output projection and the stream, so a full map T cannot be folded into either.
There m is taken as the norm's output, and only "channel" applies: a diagonal T scales the norm's
elementwise weight (w' = w t, or (1 + w) t - 1 for Gemma's offset parameterisation, told apart by probing the
module and checked after the merge). "lstsq" and "cosine" are refused there with that advice.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from shortllm.errors import PlanError, UnsupportedModelError, UsageError
from shortllm.model.adapters import get_adapter, model_device
from shortllm.model.hooks import block_output
from shortllm.ops.gram import gram_
from shortllm.pruning.plans import Plan
from shortllm.pruning.removal import prune

METHODS = ("lstsq", "cosine", "channel")
# modules that renormalise the MLP branch after its output projection: m T would not reach the stream linearly
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


@dataclass
class SpanFit:
    """One healed span: blocks start .. end-1 removed, the map merged into block `anchor` (original index).
    `objective` is "mse" (mean squared error per token of the anchor output against the span output) or
    "cosine" (mean 1 - cos); `before` is its value without healing (T = I), `after` with the fitted map."""

    start: int
    end: int
    anchor: int
    n_tokens: int
    objective: str
    before: float
    after: float


@dataclass
class HealReport:
    method: str
    ridge: float
    spans: list[SpanFit] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    n_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"Healing: {self.method} (ridge {self.ridge:g}, {self.n_tokens} calibration tokens)", "",
                 "| span | anchor | objective | no healing | healed |", "|---|---|---|---|---|"]
        for s in self.spans:
            lines.append(f"| {s.start}..{s.end - 1} | {s.anchor} | {s.objective} | {s.before:.6g} | {s.after:.6g} |")
        for s in self.skipped:
            lines.append(f"| {s['start']}..{s['end'] - 1} | - | skipped: {s['reason']} | | |")
        return "\n".join(lines) + "\n"


def spans_of(removed: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive block indices, as (start, end) with end exclusive."""
    out: list[tuple[int, int]] = []
    for i in sorted(removed):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _check_model(model: nn.Module, plan: Plan, adapter) -> None:
    if getattr(model, "shortllm_plan", None) is not None:
        raise PlanError("heal() needs the UNPRUNED model (it measures the removed blocks on calibration data and "
                        "then prunes); load the original model and pass it with the plan")
    plan.check_model(model)
    if plan.removed_branches:
        raise PlanError(f"healing fits maps across removed block spans; this plan also removes branches "
                        f"{plan.removed_branches}, which healing does not cover. Heal a plan of whole blocks")
    if adapter.post_norm_blocks:
        raise UnsupportedModelError("healing merges the map into the MLP output projection, but this model "
                                    "normalises the residual stream after each branch (post-layer-norm blocks); "
                                    "prune without healing")


def _out_proj(adapter, block: nn.Module, index: int, method: str) -> nn.Module:
    """The module whose output is the MLP branch m that the map multiplies: the output projection, or the
    post-MLP norm where the block has one (then only a diagonal map merges, into the norm's weight)."""
    norms = [(n, mod) for n, mod in block.named_modules() if n.rsplit(".", 1)[-1] in _POST_MLP_NORMS]
    if norms:
        name, norm = norms[0]
        if method != "channel":
            raise UnsupportedModelError(f"block {index} renormalises its MLP output ({name}) before the residual "
                                        f"add, so a full map ({method}) cannot be merged exactly; heal with "
                                        "method='channel' (a per-channel scale merged into that norm's weight), "
                                        "or prune without healing")
        w = getattr(norm, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            raise UnsupportedModelError(f"block {index}: {name} has no elementwise weight to merge a per-channel "
                                        "map into; prune without healing")
        return norm
    proj = adapter.mlp_out(block)
    if proj is None or getattr(proj, "weight", None) is None:
        raise UnsupportedModelError(f"block {index}: no MLP output projection at '{adapter.spec.mlp_out}' to merge "
                                    "the healing map into; set mlp_out in the model's ArchSpec")
    if proj.weight.dim() == 2:  # nn.Linear, or transformers' Conv1D (GPT-2, weight [in, out]; see _merge)
        return proj
    raise UnsupportedModelError(f"block {index}: the MLP output projection {type(proj).__name__} is not a linear "
                                "layer; healing cannot merge a map into it")


class _Stop(Exception):
    """Raised by the last hook the pass needs: the blocks after it need not run."""


class _SpanStats:
    def __init__(self, start: int, end: int, d: int, device: torch.device, keep_rows: int):
        self.start, self.end, self.anchor = start, end, start - 1
        self.xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.xty = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.rr = torch.zeros((), dtype=torch.float64, device=device)  # sum |r|^2 over valid tokens
        self.n = 0
        self.keep_rows = keep_rows
        self.rows: list[tuple[Tensor, Tensor, Tensor]] = []  # (m, skip, y) float32 rows, for "cosine"
        self.kept = 0
        self.m: Optional[Tensor] = None
        self.h: Optional[Tensor] = None

    def add(self, y: Tensor, mask: Optional[Tensor]) -> None:
        d = y.shape[-1]
        m = self.m.reshape(-1, d).float()
        skip = self.h.reshape(-1, d).float() - m
        yf = y.reshape(-1, d).float()
        r = yf - skip
        gram_(m, r, mask, self.xtx, self.xty)
        valid = mask if mask is not None else torch.ones(m.shape[0], dtype=torch.bool, device=m.device)
        self.rr += r[valid].double().square().sum()
        self.n += int(valid.sum())
        if self.kept < self.keep_rows:
            take = valid.nonzero().flatten()[: self.keep_rows - self.kept]
            self.rows.append((m[take].cpu(), skip[take].cpu(), yf[take].cpu()))
            self.kept += int(take.numel())
        self.m = self.h = None


def _collect(model: nn.Module, adapter, spans: list[tuple[int, int]], data, keep_rows: int, method: str,
             progress: bool) -> list[_SpanStats]:
    blocks = adapter.blocks()
    d = int(model.config.hidden_size)
    dev = model_device(model)
    stats = [_SpanStats(s, e, d, dev, keep_rows) for s, e in spans]
    by_anchor = {st.anchor: st for st in stats}
    by_last = {st.end - 1: st for st in stats}
    last_needed = max(st.end - 1 for st in stats)
    state: dict[str, Optional[Tensor]] = {"mask": None}
    handles = []

    def on_proj(st, _mod, _args, out):
        st.m = out.detach()

    def on_anchor(st, _mod, _args, out):
        st.h = block_output(out).detach()

    def on_last(st, idx, _mod, _args, out):
        st.add(block_output(out).detach(), state["mask"])
        if idx == last_needed:
            raise _Stop

    try:
        for a, st in by_anchor.items():
            handles.append(_out_proj(adapter, blocks[a], a, method).register_forward_hook(
                lambda mod, args, out, st=st: on_proj(st, mod, args, out)))
            handles.append(blocks[a].register_forward_hook(lambda mod, args, out, st=st: on_anchor(st, mod, args, out)))
        for last, st in by_last.items():
            handles.append(blocks[last].register_forward_hook(
                lambda mod, args, out, st=st, last=last: on_last(st, last, mod, args, out)))
        from tqdm.auto import tqdm

        with torch.no_grad():
            for batch in tqdm(list(data), desc="healing: calibration pass", disable=not progress):
                ids = batch["input_ids"].to(dev)
                am = batch.get("attention_mask")
                am = torch.ones_like(ids) if am is None else am.to(dev)
                state["mask"] = am.reshape(-1).bool()
                try:
                    model(input_ids=ids, attention_mask=am, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return stats


def _mse(xtx: Tensor, xty: Tensor, rr: Tensor, t: Tensor, n: int) -> float:
    # ||m T - r||^2 = tr(T^T M^T M T) - 2 tr(T^T M^T R) + ||r||^2, from the Gram statistics alone
    val = (t * (xtx @ t)).sum() - 2 * (t * xty).sum() + rr
    return float(val) / max(n, 1)


def _cosine_loss(t: Tensor, rows: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    total = t.new_zeros(())
    count = 0
    for m, skip, y in rows:
        pred = skip.double() + m.double() @ t
        total = total + (1 - torch.nn.functional.cosine_similarity(pred, y.double(), dim=-1, eps=1e-30)).sum()
        count += m.shape[0]
    return total / max(count, 1)


def _fit(st: _SpanStats, method: str, ridge: float, cosine_steps: int) -> tuple[Tensor, SpanFit]:
    d = st.xtx.shape[0]
    xtx, xty = st.xtx.cpu(), st.xty.cpu()
    eye = torch.eye(d, dtype=torch.float64)
    lam = ridge * float(torch.diagonal(xtx).sum()) / d
    if not math.isfinite(lam) or not torch.isfinite(xty).all():
        raise PlanError(f"the calibration activations of span {st.start}..{st.end - 1} are not finite (NaN/Inf); "
                        "heal in float32, or with other calibration data")
    lam = max(lam, 1e-12)
    if method == "channel":
        t = torch.diag((torch.diagonal(xty) + lam) / (torch.diagonal(xtx) + lam))
    else:
        t = torch.linalg.solve(xtx + lam * eye, xty + lam * eye)
    if method == "cosine":
        before = float(_cosine_loss(eye, st.rows))
        start = float(_cosine_loss(t, st.rows))
        opt_t = t.contiguous().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([opt_t], lr=1.0, max_iter=max(1, cosine_steps), line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = _cosine_loss(opt_t, st.rows)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        opt_t = opt_t.detach()
        after_opt = float(_cosine_loss(opt_t, st.rows))
        best = min([(before, eye), (start, t), (after_opt, opt_t)], key=lambda c: c[0] if math.isfinite(c[0])
                   else float("inf"))
        n = sum(r[0].shape[0] for r in st.rows)
        return best[1], SpanFit(st.start, st.end, st.anchor, n, "cosine", before, best[0])
    before = _mse(xtx, xty, st.rr.cpu(), eye, st.n)
    after = _mse(xtx, xty, st.rr.cpu(), t, st.n)
    return t, SpanFit(st.start, st.end, st.anchor, st.n, "mse", before, after)


def _merge_into_norm(norm: nn.Module, scale: Tensor) -> None:
    """Scale a norm's output per channel by `scale` through its weight. Whether the module multiplies by w or by
    (1 + w) (Gemma) is read off the module itself: with w = 0 the output is 0 or the bare normalised input."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    probe = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        before = norm(probe).double()
        saved = w.detach().clone()
        w.zero_()
        if b is not None:
            saved_b = b.detach().clone()
            b.zero_()
        offset = bool(norm(probe).abs().max() > 0)
        w.copy_(saved)
        if b is not None:
            b.copy_(saved_b)
        s = scale.to(device=w.device, dtype=torch.float64)
        w.copy_((((w.double() + 1) * s - 1) if offset else (w.double() * s)).to(w.dtype))
        if b is not None:
            b.copy_((b.double() * s).to(b.dtype))
        after = norm(probe).double()
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(after, before * s, rtol=tol, atol=tol * float(before.abs().max())):
        with torch.no_grad():  # leave the module as it was, not half-merged
            w.copy_(saved)
            if b is not None:
                b.copy_(saved_b)
        raise UnsupportedModelError(f"{type(norm).__name__} does not scale its output by its weight as w or (1 + w); "
                                    "healing cannot merge a per-channel map into it")


def _merge(proj: nn.Module, t: Tensor) -> None:
    if proj.weight.dim() == 1:  # a post-MLP norm: t is diagonal here (only "channel" reaches this)
        _merge_into_norm(proj, torch.diagonal(t))
        return
    w = proj.weight
    with torch.no_grad():
        td = t.to(device=w.device)
        if hasattr(proj, "nf") and not isinstance(proj, nn.Linear):  # Conv1D: y = x W + b, W [in, out]
            w.copy_((w.double() @ td).to(w.dtype))
        else:  # Linear: y = x W^T + b, W [out, in]
            w.copy_((td.T @ w.double()).to(w.dtype))
        b = getattr(proj, "bias", None)
        if b is not None:
            b.copy_((b.double() @ td).to(b.dtype))


def heal(model: nn.Module, plan: Plan, data, method: str = "lstsq", *, ridge: float = 1e-4, cosine_steps: int = 20,
         max_rows: int = 16384, progress: bool = True) -> HealReport:
    """Heal and prune `model` (the UNPRUNED model the plan was made for) in place; returns the HealReport.

    One calibration pass over `data` (batches with input_ids / attention_mask, e.g. shortllm.data.calibration
    .calibration_loader) accumulates the Gram statistics of each removed span; a map per span is fitted by
    `method` ("lstsq", "cosine" or "channel"; see the module docstring for the exact objective and what is
    merged where), merged into the MLP output projection of the block before the span, and the plan is then
    applied (`shortllm.pruning.removal.prune`). The report is also attached as `model.shortllm_heal`.
    """
    if method not in METHODS:
        raise UsageError(f"healing method {method!r} is not one of {', '.join(METHODS)}")
    if not ridge >= 0 or not math.isfinite(ridge):
        raise UsageError(f"ridge={ridge} must be a finite number >= 0")
    adapter = get_adapter(model)
    _check_model(model, plan, adapter)
    blocks = adapter.blocks()
    spans = spans_of(plan.removed)
    report = HealReport(method=method, ridge=float(ridge))
    healable = []
    for s, e in spans:
        if s == 0:
            report.skipped.append({"start": s, "end": e, "reason": "no kept block before the span"})
        else:
            _out_proj(adapter, blocks[s - 1], s - 1, method)  # refuse unsupported layouts before the pass
            healable.append((s, e))
    if not healable:
        raise PlanError(f"nothing to heal: every removed span of {plan.removed} starts at block 0, so there is no "
                        "kept block before it to merge a map into; prune without healing")
    stats = _collect(model, adapter, healable, data, max_rows if method == "cosine" else 0, method, progress)
    if any(st.n == 0 for st in stats):
        raise PlanError("the calibration data has no valid token (attention_mask all 0); give real calibration data")
    d = int(stats[0].xtx.shape[0])
    if method != "channel" and stats[0].n < d:
        # a full D x D map from fewer rows than D is underdetermined: the fit then follows the calibration
        # tokens and can make held-out perplexity worse (measured: SmolLM2, 256 tokens for D = 576)
        warnings.warn(f"healing with {stats[0].n} calibration tokens fits a {d} x {d} map ({method}): fewer tokens "
                      f"than the hidden size {d} overfit the calibration text; give at least {d} (better 10x) "
                      "valid tokens, or use method='channel'", UserWarning, stacklevel=2)
    fits = [_fit(st, method, float(ridge), cosine_steps) for st in stats]
    for st, (t, fit) in zip(stats, fits):
        _merge(_out_proj(adapter, blocks[st.anchor], st.anchor, method), t)
        report.spans.append(fit)
    report.n_tokens = stats[0].n
    prune(model, plan, check_weights=False)  # the weights were just changed on purpose
    model.shortllm_heal = report.to_dict()
    return report
