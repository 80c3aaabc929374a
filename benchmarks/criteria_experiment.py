"""Issue 15 experiment: the newer criteria beside the 2024 anchors, with and without training-free healing.

For one built-in model (`--model smollm2-135m` or `gemma3-270m`):
- criteria: bi, taylor (Taylor+, protect 4/2), ppl, sleb (iterative PPL), bi_attn / bi_mlp (branch plans: only
  attention / only MLP branches removed; a ratio beyond what those branches hold has no plan), "branches" (both
  kinds ranked together by their bi_attn / bi_mlp scores), gate (gate-gradient), tail (drop the last blocks);
- at 20 % and 35 % of the parameters: WikiText-2 (test) and PTB (validation) perplexity (128-token LLM-Pruner
  protocol, first `eval_chunks` chunks) and the 7-task zero-shot average (first `zs_limit` items per task), each
  pruned as is and healed by `shortllm.pruning.healing.heal(model, plan, calib, method="lstsq")` (when that
  module is installed and accepts the plan; the report says why a cell has no healed number), optionally LoRA
  (`--lora`, the reproduce pipeline's recovery) for comparison;
- Kendall tau-b between every pair of criteria's per-block scores (one pass, WikiText-2, seed 0);
- stability: per criterion, tau of its ranking across calibration corpora (wikitext2, ptb, c4; seed 0) and across
  5 calibration seeds (wikitext2), and the mean pairwise Jaccard similarity of its 20 % plan (the removed blocks,
  or branches) across the same runs. SLEB's ranking is a search order of the removed blocks only: it enters the
  plan tables and (preset full: searched again per run) the plan-Jaccard stability, not the tau tables. tail is
  data-free (tau = 1).

    python benchmarks/criteria_experiment.py --model smollm2-135m --preset smoke   # a few minutes on 2 cores

Writes benchmarks/results/criteria_<model>.{json,md}; every evaluated cell is cached as JSON under
benchmarks/results/criteria_<model>_cells/ (a rerun with the same knobs skips it).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import load_average, share_of_all_params, stamp, stamp_dict, write_report  # noqa: E402

SCORED = ("bi", "taylor", "ppl", "bi_attn", "bi_mlp", "gate", "tail")  # one score_fast pass
CRITERIA = ("bi", "taylor", "ppl", "sleb", "bi_attn", "bi_mlp", "branches", "gate", "tail")
LABEL = {"bi": "BI", "taylor": "Taylor+", "ppl": "PPL", "sleb": "SLEB (iterative PPL)",
         "bi_attn": "bi_attn (attn branches)", "bi_mlp": "bi_mlp (MLP branches)",
         "branches": "bi_attn+bi_mlp (any branch)", "gate": "gate",
         "tail": "tail (last blocks)", "base": "unpruned"}
CORPORA = ("wikitext2", "ptb", "c4")
SEEDS = (0, 1, 2, 3, 4)


@dataclass
class Knobs:
    preset: str = "smoke"
    calib_samples: int = 4
    calib_seq_len: int = 128
    calib_batch: int = 4
    stab_samples: int = 4  # calibration samples of each stability run
    stab_sleb: bool = True  # search SLEB again on every stability run (its 20% plan's Jaccard)
    eval_chunks: Optional[int] = 4
    eval_seq_len: int = 128
    eval_batch: int = 8
    zs_limit: Optional[int] = 5
    zs_batch: int = 16
    ratios: tuple = (0.2, 0.35)
    lora: bool = False
    retrain_steps: int = 8
    retrain_micro_batch: int = 2
    retrain_seq_len: int = 128
    retrain_eval_examples: int = 8
    retrain_data: str = "ptb"
    heal_method: str = "lstsq"  # "channel" for Gemma-2/3 (a full map cannot pass their post-MLP norm)
    # what a ratio is a share of: "params" (all parameters, the papers' convention) or "blocks" (the decoder
    # blocks' parameters). Gemma-3-270M's embeddings are 63 % of it: 35 % of all parameters is 17 of 18 blocks
    ratio_of: str = "params"

    def key(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset"}
        for k, default in (("heal_method", "lstsq"), ("ratio_of", "params")):
            if d[k] == default:  # the default before it was a knob: cells cached then stay valid
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


PRESETS = {
    "smoke": dict(calib_samples=2, calib_batch=2, stab_samples=2, stab_sleb=False, eval_chunks=4, zs_limit=5),
    # what fits a shared 2-core machine in ~30 min: enough calibration tokens for the healing fit (16 x 128)
    "mid": dict(calib_samples=16, calib_batch=4, stab_samples=4, stab_sleb=False, eval_chunks=16, zs_limit=10),
    "full": dict(calib_samples=10, stab_samples=10, eval_chunks=32, zs_limit=50, lora=True, retrain_steps=32,
                 retrain_micro_batch=4, retrain_eval_examples=32),
}


def kendall_tau(a, b) -> float:
    """Kendall tau-b of two score vectors (ties in either count as neither concordant nor discordant)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    conc = disc = ta = tb = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ta += 1
        elif db == 0:
            tb += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    den = math.sqrt((conc + disc + ta) * (conc + disc + tb))
    return (conc - disc) / den if den else float("nan")


def jaccard(a, b) -> float:
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def _units(plan) -> list:
    """What a plan removes, as comparable items: ("block", i) and ("attn"/"mlp", i)."""
    return [("block", int(i)) for i in plan.removed] + [(k, int(b)) for k, b in plan.removed_branches]


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def _write(path: Path, obj) -> None:
    from shortllm.io.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


# ---------------------------------------------------------------- scoring and plans
def calib(tok, corpus: str, n: int, knobs: Knobs, seed: int):
    from shortllm.data.calibration import calibration_loader

    return calibration_loader(corpus, tok, n_samples=n, seq_len=knobs.calib_seq_len, batch_size=knobs.calib_batch,
                              seed=seed)


def score_run(model, data, cache: Path, log):
    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.scores import Scores

    if cache.exists():
        return Scores.load(cache, model=model), _json(cache.with_suffix(".time.json"))
    t0 = time.perf_counter()
    s = score_fast(model, data, metrics=SCORED, progress=False)
    wall = time.perf_counter() - t0
    s.save(cache)
    _write(cache.with_suffix(".time.json"), {"wall_s": wall})
    log(f"scored {cache.stem} in {wall:.0f}s")
    return s, {"wall_s": wall}


def sleb_order(model, data, n: int, cache: Path, log) -> list[int]:
    from shortllm.scoring.search import iterative

    raw = _json(cache)
    if raw and len(raw["order"]) >= n:
        return raw["order"]
    t0 = time.perf_counter()
    res = iterative(model, data, n, protect=(0, 0), progress=False)
    _write(cache, {"order": [int(x) for x in res.order], "wall_s": time.perf_counter() - t0})
    log(f"SLEB {cache.stem}: {n} rounds in {time.perf_counter() - t0:.0f}s")
    return [int(x) for x in res.order]


def sleb_needed(model, knobs: Knobs) -> int:
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.sizes import blocks_for_ratio, count_params

    bp = [count_params(b) for b in get_adapter(model).blocks()]
    order = sorted(range(len(bp)), key=lambda i: bp[i])
    total = count_params(model)
    return max(blocks_for_ratio(share_of_all_params(model, r, knobs.ratio_of), order, bp, total) for r in knobs.ratios)


def joint_branches(model, scores, ratio: float) -> list[tuple[str, int]]:
    """Attention and MLP branches ranked together by their own bi_attn / bi_mlp scores (both 1 - mean cos of the
    stream before and after the branch), taken from the lowest until the removed parameter share is closest to
    `ratio`; a block losing both branches is removed whole by make_plan."""
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.sizes import blocks_for_ratio, count_params

    adapter = get_adapter(model)
    units = [(float(scores.per_block(f"bi_{k}")[i]), k, i) for k in ("attn", "mlp") for i in range(adapter.num_layers)]
    units.sort()
    params = [count_params(adapter.branch(adapter.blocks()[i], k)) for _, k, i in units]
    n = blocks_for_ratio(float(ratio), list(range(len(units))), params, count_params(model))
    return [(k, i) for _, k, i in units[:n]]


def plan_for(model, scores, crit: str, ratio: float, order: Optional[list[int]]):
    """(plan, None) or (None, why not) for one criterion at one parameter ratio."""
    from shortllm.errors import PlanError
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.sizes import blocks_for_ratio, count_params

    try:
        if crit == "branches":
            return make_plan(None, model=model, branches=joint_branches(model, scores, ratio)), None
        if crit == "sleb":
            blocks = get_adapter(model).blocks()
            k = blocks_for_ratio(float(ratio), order, [count_params(b) for b in blocks], count_params(model))
            plan = make_plan(None, model=model, blocks=order[:k])
            plan.metric = "ppl-iterative"
            return plan, None
        return make_plan(scores, crit, model=model, ratio=float(ratio)), None
    except PlanError as exc:
        return None, str(exc)


# ---------------------------------------------------------------- evaluation
def evaluate(model, tok, texts, knobs: Knobs, data_dir=None) -> dict:
    from reproduce_paper import evaluate_model

    return evaluate_model(model, tok, texts, knobs, data_dir)


def healed_model(model, plan, data, method: str):
    """(healed pruned copy, report dict) or (None, reason)."""
    try:
        from shortllm.pruning.healing import heal
    except ImportError as exc:
        return None, f"healing not installed ({exc})"
    from shortllm.errors import ShortLLMError

    m = copy.deepcopy(model)
    try:
        rep = heal(m, plan, data, method=method, progress=False)
    except ShortLLMError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    info = rep.to_dict() if hasattr(rep, "to_dict") else {}
    return m, info


def lora_model(model, tok, knobs: Knobs, rdata):
    from shortllm.retrain.config import RetrainConfig
    from shortllm.retrain.training import retrain_model

    cfg = RetrainConfig(method="lora", steps=knobs.retrain_steps, micro_batch_size=knobs.retrain_micro_batch,
                        seq_len=knobs.retrain_seq_len, eval_max_examples=knobs.retrain_eval_examples, seed=0)
    rr = retrain_model(model, tok, rdata, cfg, progress=False)
    rr.model.eval()
    return rr.model, {"tokens_seen": rr.tokens_seen, "heldout_ppl_before": rr.ppl_before,
                      "heldout_ppl_after": rr.ppl_after}


def run(model_name: str, knobs: Knobs, out_dir: Path, data_dir: Optional[str], log) -> dict:
    from reproduce_paper import eval_texts

    from shortllm.model.loading import load_model
    from shortllm.pruning.removal import prune

    model, tok = load_model(model_name)
    model.eval()
    cells_dir = out_dir / f"k{knobs.key()}"
    cells_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    main_data = calib(tok, "wikitext2", knobs.calib_samples, knobs, 0)
    scores, score_time = score_run(model, main_data, cells_dir / "scores_main.json", log)
    order = sleb_order(model, main_data, sleb_needed(model, knobs), cells_dir / "sleb_main.json", log)
    texts = eval_texts(tok, knobs, data_dir)
    rdata = None
    cells = {}

    def cell(key: str, make):
        path = cells_dir / f"cell_{key}.json"
        c = _json(path)
        if c is None:
            t0 = time.perf_counter()
            c = make()
            c["wall_s"] = time.perf_counter() - t0
            if not c.get("uncached"):  # "healing not installed" is redone once healing is there
                _write(path, c)
            if "ppl_wikitext2" in c:
                log(f"{key}: wiki2 {c['ppl_wikitext2']:.2f} ptb {c['ppl_ptb']:.2f} zs {c['zs_mean']:.3f} "
                    f"({c['wall_s']:.0f}s)")
            else:
                log(f"{key}: {c.get('note', '')[:120]}")
        cells[key] = c

    cell("base", lambda: evaluate(model, tok, texts, knobs, data_dir))
    plans = {}
    for r in knobs.ratios:
        for crit in CRITERIA:
            plan, why = plan_for(model, scores, crit, share_of_all_params(model, r, knobs.ratio_of), order)
            plans[(crit, r)] = plan
            tag = f"{crit}_r{int(round(r * 100)):02d}"
            if plan is None:
                for rec in ("none", "heal") + (("lora",) if knobs.lora else ()):
                    cells[f"{tag}_{rec}"] = {"note": f"no plan: {why}"}
                continue
            info = {"removed": plan.removed, "removed_branches": [list(x) for x in plan.removed_branches],
                    "removed_fraction": plan.removed_fraction}

            def plain(plan=plan, info=info):
                m = prune(model, plan, inplace=False)
                return {**info, **evaluate(m, tok, texts, knobs, data_dir)}

            def healed(plan=plan, info=info):
                m, rep = healed_model(model, plan, main_data, knobs.heal_method)
                if m is None:
                    return {**info, "note": rep, "uncached": rep.startswith("healing not installed")}
                return {**info, "heal": rep, **evaluate(m, tok, texts, knobs, data_dir)}

            cell(f"{tag}_none", plain)
            cell(f"{tag}_heal", healed)
            if knobs.lora:
                def lora(plan=plan, info=info):
                    nonlocal rdata
                    if rdata is None:
                        from shortllm.retrain.train_data import load_retrain_data

                        rdata = load_retrain_data(knobs.retrain_data, tok, knobs.retrain_seq_len, 0.05, data_dir)
                    m, rinfo = lora_model(prune(model, plan, inplace=False), tok, knobs, rdata)
                    return {**info, "retrain": rinfo, **evaluate(m, tok, texts, knobs, data_dir)}
                cell(f"{tag}_lora", lora)

    # ---- rankings: tau between criteria, stability across corpora and seeds
    per_block = {m: scores.per_block(m).tolist() for m in SCORED}
    tau = {a: {b: kendall_tau(per_block[a], per_block[b]) for b in SCORED} for a in SCORED}
    runs = {"wikitext2/s0": (scores, order)}
    sleb_n = sleb_needed(model, dataclasses.replace(knobs, ratios=(min(knobs.ratios),)))  # the 20% plan only
    for name, corpus, seed in [(f"{c}/s0", c, 0) for c in CORPORA[1:]] + [(f"wikitext2/s{s}", "wikitext2", s)
                                                                            for s in SEEDS[1:]]:
        d = calib(tok, corpus, knobs.stab_samples, knobs, seed)
        slug = name.replace("/", "_")
        s, _ = score_run(model, d, cells_dir / f"scores_{slug}.json", log)
        runs[name] = (s, sleb_order(model, d, sleb_n, cells_dir / f"sleb_{slug}.json", log) if knobs.stab_sleb
                      else None)
    corpus_runs = [f"{c}/s0" for c in CORPORA]
    seed_runs = [f"wikitext2/s{s}" for s in SEEDS]
    r20 = min(knobs.ratios)
    share20 = share_of_all_params(model, r20, knobs.ratio_of)
    stability = {}
    for crit in CRITERIA:
        row = {}
        for label, names in (("corpora", corpus_runs), ("seeds", seed_runs)):
            if crit in SCORED:
                taus = [kendall_tau(runs[a][0].per_block(crit).tolist(), runs[b][0].per_block(crit).tolist())
                        for a, b in itertools.combinations(names, 2)]
                row[f"tau_{label}_mean"] = sum(taus) / len(taus)
                row[f"tau_{label}_min"] = min(taus)
            if crit == "sleb" and not knobs.stab_sleb:
                continue
            ps = [plan_for(model, runs[n][0], crit, share20, runs[n][1])[0] for n in names]
            if all(p is not None for p in ps):
                js = [jaccard(_units(a), _units(b)) for a, b in itertools.combinations(ps, 2)]
                row[f"jaccard20_{label}_mean"] = sum(js) / len(js)
                row[f"jaccard20_{label}_min"] = min(js)
        stability[crit] = row
    timed = list(cells_dir.glob("*.time.json")) + list(cells_dir.glob("sleb_*"))
    compute = sum(c.get("wall_s", 0.0) for c in cells.values())
    compute += sum((_json(f) or {}).get("wall_s", 0.0) for f in timed)
    return {"model": model_name, "knobs": dataclasses.asdict(knobs), "stamp": stamp_dict(), "load": load_average(),
            "wall_s": time.perf_counter() - t_start, "compute_s": compute, "score_time": score_time,
            "scores": per_block,
            "sleb_order": order, "cells": cells, "tau": tau, "stability": stability,
            "healing_available": _healing_available()}


def _healing_available() -> bool:
    try:
        import shortllm.pruning.healing  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- report
def _f(x, nd=2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def findings(res: dict) -> list[str]:
    """Closing note: statements computed from the numbers above (nothing hand-written)."""
    cells, out = res["cells"], []
    base = cells["base"]
    for r in res["knobs"]["ratios"]:
        tag = f"r{int(round(r * 100)):02d}"
        done = {c: cells[f"{c}_{tag}_none"] for c in CRITERIA if "ppl_wikitext2" in cells.get(f"{c}_{tag}_none", {})}
        if done:
            best = min(done, key=lambda c: done[c]["ppl_wikitext2"])
            worst = max(done, key=lambda c: done[c]["ppl_wikitext2"])
            out.append(f"At {int(r * 100)}% without recovery the lowest WikiText-2 PPL is {LABEL[best]}'s "
                       f"{done[best]['ppl_wikitext2']:.1f} (unpruned {base['ppl_wikitext2']:.1f}), the highest "
                       f"{LABEL[worst]}'s {done[worst]['ppl_wikitext2']:.1f}; best zero-shot average: "
                       f"{LABEL[max(done, key=lambda c: done[c]['zs_mean'])]} "
                       f"({max(d['zs_mean'] for d in done.values()):.3f}, unpruned {base['zs_mean']:.3f}).")
        pairs = [(c, cells[f"{c}_{tag}_none"], cells.get(f"{c}_{tag}_heal", {})) for c in done]
        healed = [(c, a, b) for c, a, b in pairs if "ppl_wikitext2" in b]
        if healed:
            better = [c for c, a, b in healed if b["ppl_wikitext2"] < a["ppl_wikitext2"]]
            ratios = [b["ppl_wikitext2"] / a["ppl_wikitext2"] for _, a, b in healed]
            method = res["knobs"].get("heal_method", "lstsq")
            out.append(f"At {int(r * 100)}% {method} healing lowered WikiText-2 PPL for {len(better)} of {len(healed)} "
                       f"healable plans (healed/unhealed PPL ratio {min(ratios):.2f}–{max(ratios):.2f}).")
    if not res["healing_available"]:
        out.append("Healing was not installed in this tree (shortllm.pruning.healing missing): no healed column.")
    st = res["stability"]
    scored = [c for c in CRITERIA if "tau_seeds_mean" in st[c] and c != "tail"]
    if scored:
        most = max(scored, key=lambda c: st[c]["tau_seeds_mean"])
        least = min(scored, key=lambda c: st[c]["tau_seeds_mean"])
        out.append(f"Across 5 calibration seeds the most stable ranking is {LABEL[most]}'s (mean tau "
                   f"{st[most]['tau_seeds_mean']:.2f}), the least {LABEL[least]}'s "
                   f"({st[least]['tau_seeds_mean']:.2f}); "
                   "across corpora: " + ", ".join(f"{c} {st[c]['tau_corpora_mean']:.2f}" for c in scored) + ".")
    t = res["tau"]
    pairs = [(a, b, t[a][b]) for a, b in itertools.combinations([m for m in SCORED if m != "tail"], 2)]
    if pairs:
        hi = max(pairs, key=lambda x: x[2])
        lo = min(pairs, key=lambda x: x[2])
        out.append(f"Most similar rankings: {hi[0]} and {hi[1]} (tau {hi[2]:.2f}); least: {lo[0]} and {lo[1]} "
                   f"(tau {lo[2]:.2f}); tail vs bi tau {t['tail']['bi']:.2f}.")
    return out


def markdown(res: dict) -> str:
    k = res["knobs"]
    cells = res["cells"]
    recs = ("none", "heal") + (("lora",) if k["lora"] else ())
    lines = [f"## Criteria: sub-layer, gate-gradient, tail, healing ({res['model']}, preset {k['preset']})", "",
             f"`python benchmarks/criteria_experiment.py --model {res['model']} --preset {k['preset']}"
             + (f" --heal-method {k['heal_method']}" if k.get("heal_method", "lstsq") != "lstsq" else "")
             + (f" --ratio-of {k['ratio_of']}" if k.get("ratio_of", "params") != "params" else "")
             + (" --lora" if k["lora"] and k["preset"] != "full" else "") + "`; "
             f"{stamp_line(res['stamp'])}; {res['load']}; this invocation {res['wall_s'] / 60:.1f} min wall (cached "
             f"cells reused); all cells, scoring passes and searches together {res['compute_s'] / 60:.1f} min.", "",
             f"Calibration: WikiText-2, {k['calib_samples']} x {k['calib_seq_len']} tokens, seed 0 (one score_fast "
             "pass "
             f"for {', '.join(SCORED)}: {res['score_time']['wall_s']:.0f} s). Evaluation: WikiText-2 test / PTB "
             f"validation PPL on the first {k['eval_chunks']} chunks of {k['eval_seq_len']} tokens; zero-shot "
             f"average of 7 tasks on the first {k['zs_limit']} items each. Healing: {k.get('heal_method', 'lstsq')} "
             f"(`shortllm.pruning.healing.heal`) on the same calibration batches. Ratios are of "
             + ("the parameters." if k.get("ratio_of", "params") == "params" else
                "the decoder blocks' parameters (embeddings excluded); 'removed' is of all parameters.") + "", "",
             "| criterion | ratio | removed | recovery | wiki2 PPL | PTB PPL | zero-shot avg |",
             "|---|---|---|---|---|---|---|"]
    b = cells["base"]
    lines.append(f"| unpruned | 0 | — | — | {_f(b['ppl_wikitext2'])} | {_f(b['ppl_ptb'])} | {_f(b['zs_mean'], 3)} |")
    notes = []
    for r in k["ratios"]:
        for crit in CRITERIA:
            for rec in recs:
                c = cells.get(f"{crit}_r{int(round(r * 100)):02d}_{rec}", {})
                what = c.get("removed_branches") and ", ".join(f"{x[0]}{x[1]}" for x in c["removed_branches"]) \
                    or (str(c["removed"]) if "removed" in c else "—")
                if "ppl_wikitext2" in c:
                    lines.append(f"| {LABEL[crit]} | {int(r * 100)}% ({c['removed_fraction']:.1%}) | {what} | {rec} | "
                                 f"{_f(c['ppl_wikitext2'])} | {_f(c['ppl_ptb'])} | {_f(c['zs_mean'], 3)} |")
                else:
                    notes.append(f"{LABEL[crit]} at {int(r * 100)}%, {rec}: {c.get('note', 'not run')}")
    if notes:
        lines += ["", "Cells without numbers:", ""] + [f"- {n}" for n in sorted(set(notes))]
    lines += ["", "Kendall tau-b between the criteria's per-block scores (WikiText-2 calibration, seed 0):", "",
              "| | " + " | ".join(SCORED) + " |", "|---" * (len(SCORED) + 1) + "|"]
    for a in SCORED:
        lines.append(f"| {a} | " + " | ".join(_f(res["tau"][a][b]) for b in SCORED) + " |")
    lines += ["", "Stability: mean (min) pairwise Kendall tau of each criterion's ranking across calibration corpora "
              "(wikitext2, ptb, c4) and across 5 seeds (wikitext2); mean (min) pairwise Jaccard of its 20% plan.", "",
              "| criterion | tau corpora | tau seeds | Jaccard 20% corpora | Jaccard 20% seeds |",
              "|---|---|---|---|---|"]
    for crit in CRITERIA:
        s = res["stability"][crit]

        def pair(name, s=s):
            return f"{_f(s.get(name + '_mean'))} ({_f(s.get(name + '_min'))})" if name + "_mean" in s else "—"
        lines.append(f"| {LABEL[crit]} | {pair('tau_corpora')} | {pair('tau_seeds')} | {pair('jaccard20_corpora')} | "
                     f"{pair('jaccard20_seeds')} |")
    lines += ["", "What holds (computed from the tables above):", ""] + [f"- {x}" for x in findings(res)]
    return "\n".join(lines) + "\n"


def stamp_line(s: dict) -> str:
    return (f"{s['date']}; {s['cpu']}, {s['cores']} cores; python {s['python']}, torch {s['torch']}, "
            f"transformers {s['transformers']}; commit {s['commit']}{' (dirty tree)' if s['dirty'] else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="built-in model name (smollm2-135m, gemma3-270m)")
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke")
    ap.add_argument("--zs-limit", type=int, help="items per zero-shot task (0 = all)")
    ap.add_argument("--eval-chunks", type=int, help="128-token chunks per PPL corpus (0 = all)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                    help="also LoRA-recover each plan (default: on for full, off for smoke)")
    ap.add_argument("--heal-method", choices=("lstsq", "cosine", "channel"),
                    help="healing method (default lstsq; Gemma-2/3 take only channel)")
    ap.add_argument("--ratio-of", choices=("params", "blocks"),
                    help="ratios as a share of all parameters (default) or of the decoder blocks' parameters")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--data-dir", help="shared data folder (default: $SHORTLLM_DATA)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where criteria_<model>.{json,md} go")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.data_dir:
        os.environ["SHORTLLM_DATA"] = a.data_dir
    knobs = Knobs(**dict(PRESETS[a.preset], preset=a.preset))
    if a.zs_limit is not None:
        knobs.zs_limit = a.zs_limit or None
    if a.eval_chunks is not None:
        knobs.eval_chunks = a.eval_chunks or None
    if a.lora is not None:
        knobs.lora = a.lora
    if a.heal_method:
        knobs.heal_method = a.heal_method
    if a.ratio_of:
        knobs.ratio_of = a.ratio_of
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = Path(a.results)
    slug = a.model.lower().replace("/", "_")
    res = run(a.model, knobs, results / f"criteria_{slug}_cells", a.data_dir, log)
    _write(results / f"criteria_{slug}.json", res)
    write_report(results / f"criteria_{slug}.md", markdown(res))
    log(f"{stamp()}: wrote {results / f'criteria_{slug}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
