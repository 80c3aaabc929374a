"""Recovery after depth pruning at equal token budgets: none / LoRA / CPT / KD / partial, per criterion and ratio.

Design: criteria {Taylor+, PPL (one-shot), BI, tail} x removal {20 %, 35 % of the parameters} x recovery
{none, lora, cpt, kd, partial}. Every recovery trains on PTB *train* with the same token budget (``tokens``;
steps = tokens / (micro-batch x seq_len)), through `shortllm.retrain.training.retrain_model` (transformers'
Trainer); KD distils from the unpruned model, partial trains the head and the last 2 blocks. Metrics:
WikiText-2 (test) and PTB (validation) perplexity, LLM-Pruner 128-token protocol (`shortllm.evaluation.
corpus_ppl`), and the 7-task zero-shot mean through lm-eval-harness (`zero_shot_scores`).
"tail" is the Gromov et al. baseline: the deepest blocks before the last one (``make_plan(..., blocks=...)``
unless the scorer offers a "tail" metric).

    python benchmarks/recovery_experiment.py --model smollm2-135m --preset smoke --criteria taylor --ratios 0.2

Each cell is one JSON file under ``--out`` (atomic); a rerun skips finished cells with the same knobs.
Writes benchmarks/results/recovery_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import share_of_all_params, stamp, stamp_dict, write_report  # noqa: E402

from shortllm.errors import DataError, UsageError  # noqa: E402
from shortllm.io.atomic import atomic_write_text  # noqa: E402

CRITERIA = ("taylor", "ppl", "bi", "tail")
LABEL = {"taylor": "Taylor+", "ppl": "PPL", "bi": "BI", "tail": "tail", "base": "unpruned"}
RECOVERIES = ("none", "lora", "cpt", "kd", "partial")
EVAL_CORPORA = ("wikitext2", "ptb")
FORMAT = "shortllm.recovery/1"


@dataclass
class Knobs:
    """Every setting a number depends on; a cell computed with other knobs is recomputed."""

    preset: str = "smoke"
    calib_corpus: str = "wikitext2"
    calib_samples: int = 4
    calib_seq_len: int = 128
    eval_chunks: Optional[int] = 8
    zs_limit: Optional[int] = 20
    tokens: int = 2048
    micro_batch: int = 2
    grad_accum: int = 1
    seq_len: int = 128
    eval_examples: int = 8
    last_k: int = 2
    data: str = "ptb"
    protect_plus: tuple = (4, 2)
    seed: int = 0
    mmlu_limit: Optional[int] = 1  # questions per subject (57 subjects); None = all 14,042
    mmlu_shots: tuple = (0, 5)
    # 5-shot MMLU costs ~7x the 0-shot run (contexts of ~600 tokens): the unpruned model and these recoveries
    mmlu_fewshot_recoveries: tuple = ("none", "lora", "cpt", "kd", "partial")
    # the recoveries whose cells get MMLU at all ("none" also covers the unpruned model): MMLU can be added
    # to the cheap unrecovered cells of a grid without redoing its retrained ones
    mmlu_recoveries: tuple = ("none", "lora", "cpt", "kd", "partial")
    ratio_of: str = "params"  # or "blocks": a share of the decoder blocks' parameters (see criteria_experiment)

    def shots_for(self, recovery: str) -> tuple:
        if recovery not in self.mmlu_recoveries:
            return ()
        return tuple(k for k in self.mmlu_shots if k == 0 or recovery in self.mmlu_fewshot_recoveries)

    def cell_knobs(self, recovery: str) -> dict:
        d = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "preset"}))
        if recovery == "none":
            for k in ("tokens", "micro_batch", "grad_accum", "seq_len", "eval_examples", "last_k", "data"):
                d.pop(k)
        d["mmlu_shots"] = list(self.shots_for(recovery))
        d.pop("mmlu_fewshot_recoveries")
        d.pop("mmlu_recoveries")
        if d["ratio_of"] == "params":  # the default before it was a knob: cells computed then stay valid
            d.pop("ratio_of")
        return d


PRESETS = {
    # smoke: 16 steps x 2 x 128 tokens per recovery, 8 eval chunks, 20 items per task
    "smoke": dict(calib_samples=4, eval_chunks=8, zs_limit=20, tokens=16 * 2 * 128, micro_batch=2, mmlu_limit=1,
                  mmlu_shots=()),
    # full: 512 steps x 8 x 128 = 524k tokens per recovery, whole eval splits and tasks
    # mid: what fits one core for SmolLM2's whole grid (~1.5 h): 16 steps x 2 x 128 tokens per recovery, 8 eval
    # chunks, 10 items per zero-shot task, MMLU 1 question per subject (0-shot; 5-shot unpruned and unrecovered)
    "mid": dict(calib_samples=8, eval_chunks=8, zs_limit=10, tokens=16 * 2 * 128, micro_batch=2, mmlu_limit=1,
                mmlu_fewshot_recoveries=("none",)),
    "full": dict(calib_samples=32, eval_chunks=None, zs_limit=None, tokens=512 * 8 * 128, micro_batch=8,
                 eval_examples=64, mmlu_limit=None),
}


def zero_shot_scores(model, tok, knobs: Knobs, data_dir=None) -> dict:
    """The 7-task zero-shot evaluation of one model through lm-eval-harness: {"tasks": {name: score}, "mean": float}
    (score = each task's reported metric, `shortllm.evaluation.harness.REPORTED`)."""
    from shortllm.evaluation.harness import SEVEN, harness_eval

    r = harness_eval(model, tok, SEVEN, limit=knobs.zs_limit, data_dir=data_dir)
    return {"tasks": {k: r.tasks[k]["score"] for k in SEVEN}, "mean": r.mean}


def evaluate(model, tok, knobs: Knobs, data_dir=None, shots: tuple = (0,)) -> dict:
    from shortllm.evaluation.corpus_ppl import perplexity

    out = {}
    for c in EVAL_CORPORA:
        out[f"ppl_{c}"] = perplexity(model, tok, c, seq_len=128, max_chunks=knobs.eval_chunks, progress=False,
                                     data_dir=data_dir).ppl
    out["zeroshot"] = zero_shot_scores(model, tok, knobs, data_dir)
    out["mmlu"] = mmlu_scores(model, tok, knobs, shots, data_dir)
    return out


def mmlu_scores(model, tok, knobs: Knobs, shots_list: tuple, data_dir=None) -> dict:
    """MMLU through lm-eval's formulation at each of ``shots_list``: {shots: {"acc", "n", "categories"}}
    (the first ``mmlu_limit`` test questions of every subject; few-shot examples from its dev split)."""
    from shortllm.evaluation.harness import harness_eval

    out = {}
    for shots in shots_list:
        r = harness_eval(model, tok, ["mmlu"], num_fewshot=int(shots), limit=knobs.mmlu_limit, data_dir=data_dir)
        m = r.tasks["mmlu"]
        out[str(shots)] = {"acc": m["score"], "n": m["n"],
                           "categories": {c: v.get("acc") for c, v in m["categories"].items()}}
    return out


def make_plans(model, scores, criteria, ratios, knobs: Knobs) -> dict:
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.sizes import blocks_for_ratio, count_params

    plans = {}
    for r0 in ratios:
        r = share_of_all_params(model, r0, knobs.ratio_of)
        for c in criteria:
            if c == "tail" and (scores is None or "tail" not in scores.values):
                blocks = get_adapter(model).blocks()
                order = list(range(len(blocks) - 2, -1, -1))  # deepest first, the last block kept
                k = blocks_for_ratio(float(r), order, [count_params(b) for b in blocks], count_params(model))
                plans[(c, r0)] = make_plan(None, model=model, blocks=order[:k])
                plans[(c, r0)].metric = "tail"
            else:
                prot = tuple(knobs.protect_plus) if c == "taylor" else (0, 0)
                plans[(c, r0)] = make_plan(scores, c, model=model, ratio=r, protect=prot)
    return plans


def recover(pruned, teacher, tok, rdata, method: str, knobs: Knobs) -> tuple:
    from shortllm.retrain.config import RetrainConfig
    from shortllm.retrain.training import retrain_model

    cfg = RetrainConfig(method=method, tokens=knobs.tokens, micro_batch_size=knobs.micro_batch,
                        grad_accum=knobs.grad_accum, seq_len=knobs.seq_len, eval_max_examples=knobs.eval_examples,
                        seed=knobs.seed, last_k=knobs.last_k if method == "partial" else None)
    r = retrain_model(pruned, tok, rdata, cfg, progress=False, teacher=teacher if method == "kd" else None)
    info = {"steps": r.steps_done, "tokens_seen": r.tokens_seen, "lr": cfg.resolved_lr,
            "heldout_ppl_before": r.ppl_before, "heldout_ppl_after": r.ppl_after,
            "first_loss": r.losses[0], "final_loss": r.losses[-1], "train_s": r.wall_s}
    return r.model.eval(), info


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def run(model, tok, knobs: Knobs, criteria, ratios, recoveries, out: Path, data_dir=None, progress=True,
        log=print, compute: bool = True) -> dict:
    """Compute every missing cell under ``out/cells`` (none when not ``compute``) and return {key: cell}."""
    from shortllm.data.calibration import calibration_loader
    from shortllm.pruning.removal import prune
    from shortllm.retrain.train_data import load_retrain_data
    from shortllm.scoring.engine import score_fast

    (out / "cells").mkdir(parents=True, exist_ok=True)
    model.eval()
    cells = [("base", None, "none")] + [(c, r, m) for r in ratios for c in criteria for m in recoveries]
    key = lambda c, r, m: "base" if c == "base" else f"{c}_r{int(round(r * 100)):02d}_{m}"  # noqa: E731
    todo = [x for x in cells if not ((d := _read(out / "cells" / f"{key(*x)}.json")) and d.get("format") == FORMAT
                                     and d.get("knobs") == knobs.cell_knobs(x[2]))]
    log(f"{len(cells) - len(todo)} of {len(cells)} cells already done")
    if not compute:
        todo = []
    plans = rdata = None
    for c, r, m in tqdm(todo, desc="recovery cells", unit="cell", disable=not progress):
        t0 = time.perf_counter()
        cell = {"format": FORMAT, "key": key(c, r, m), "criterion": c, "ratio": r, "recovery": m,
                "knobs": knobs.cell_knobs(m)}
        if c == "base":
            cell.update(evaluate(model, tok, knobs, data_dir, knobs.shots_for("none")))
        else:
            if plans is None:
                calib = calibration_loader(knobs.calib_corpus, tok, n_samples=knobs.calib_samples,
                                           seq_len=knobs.calib_seq_len, seed=knobs.seed)
                scores = score_fast(model, calib, metrics=("bi", "taylor", "ppl"), progress=progress)
                plans = make_plans(model, scores, criteria, ratios, knobs)
            plan = plans[(c, r)]
            cell.update(removed=list(plan.removed), removed_fraction=plan.removed_fraction)
            pruned = prune(model, plan, inplace=False)
            if m != "none":
                if rdata is None:
                    rdata = load_retrain_data(knobs.data, tok, knobs.seq_len, 0.05, data_dir)
                pruned, cell["retrain"] = recover(pruned, model, tok, rdata, m, knobs)
            cell.update(evaluate(pruned, tok, knobs, data_dir, knobs.shots_for(m)))
            del pruned
        cell["wall_s"] = time.perf_counter() - t0
        atomic_write_text(out / "cells" / f"{cell['key']}.json", json.dumps(cell, indent=1))
        log(f"{cell['key']}: wiki2 {cell['ppl_wikitext2']:.2f} ptb {cell['ppl_ptb']:.2f} "
            f"zs {cell['zeroshot']['mean']:.3f} ({cell['wall_s']:.0f}s)")
    return {key(*x): d for x in cells if (d := _read(out / "cells" / f"{key(*x)}.json"))
            and d.get("knobs") == knobs.cell_knobs(x[2])}


def _median(xs: list) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def findings(cells: dict, n_layers: int) -> list[str]:
    """The seed papers' claims and what KD / partial add, each computed from the cells (nothing typed in)."""
    def get(c, r, m):
        return cells.get(f"{c}_r{int(round(r * 100)):02d}_{m}")

    ratios = sorted({c["ratio"] for c in cells.values() if c.get("ratio") is not None})
    crits = [c for c in CRITERIA if any(get(c, r, "none") for r in ratios)]
    out = []
    for r in ratios:
        none = {c: get(c, r, "none") for c in crits if get(c, r, "none")}
        if len(none) < 2:
            continue
        best_ppl = min(none, key=lambda c: none[c]["ppl_wikitext2"])
        best_zs = max(none, key=lambda c: none[c]["zeroshot"]["mean"])
        zs = ", ".join(f"{LABEL[c]} {100 * none[c]['zeroshot']['mean']:.1f}" for c in none)
        other = ("" if best_ppl == "ppl" else "; PPL criterion "
                 + (f"{none['ppl']['ppl_wikitext2']:.1f}" if "ppl" in none else "not run"))
        name = "the PPL criterion" if best_ppl == "ppl" else LABEL[best_ppl]
        out.append(f"(a) {int(r * 100)}%, no recovery: lowest WikiText-2 PPL: {name} "
                   f"({none[best_ppl]['ppl_wikitext2']:.1f}{other}); best 7-task mean: {LABEL[best_zs]} ({zs}).")
    deep = {}
    for c in crits:
        removed = [i for r in ratios if get(c, r, "none") for i in get(c, r, "none")["removed"]]
        if removed:
            deep[c] = sum(i >= n_layers / 2 for i in removed) / len(removed)
    if deep:
        out.append("(b) share of removed blocks in the deeper half (all ratios): "
                   + ", ".join(f"{LABEL[c]} {100 * v:.0f}%" for c, v in deep.items()) + ".")
    for a, b, tag in (("cpt", "lora", "(c) CPT vs LoRA"), ("kd", "cpt", "KD vs CPT"), ("kd", "lora", "KD vs LoRA"),
                      ("partial", "lora", "partial vs LoRA")):
        for r in ratios:
            pairs = [(get(c, r, a), get(c, r, b)) for c in crits if get(c, r, a) and get(c, r, b)]
            if not pairs:
                continue
            wins = sum(x["ppl_wikitext2"] < y["ppl_wikitext2"] for x, y in pairs)
            ratio = _median([x["ppl_wikitext2"] / y["ppl_wikitext2"] for x, y in pairs])
            zs = _median([x["zeroshot"]["mean"] - y["zeroshot"]["mean"] for x, y in pairs])
            out.append(f"{tag} at {int(r * 100)}%: lower WikiText-2 PPL for {wins} of {len(pairs)} criteria "
                       f"(median PPL ratio {ratio:.2f}; median 7-task mean difference {100 * zs:+.1f} points).")
    mm = [c["mmlu"]["0"]["acc"] for c in cells.values() if "0" in c.get("mmlu", {})]
    if mm:
        n = next(c["mmlu"]["0"]["n"] for c in cells.values() if "0" in c.get("mmlu", {}))
        se = 100 * (0.25 * 0.75 / max(n, 1)) ** 0.5
        off = sum(abs(100 * a - 25) > 2 * se for a in mm)
        out.append(f"MMLU 0-shot spans {100 * min(mm):.1f}-{100 * max(mm):.1f} over {len(mm)} cells, on {n} questions "
                   f"(chance 25%, binomial SE at chance {se:.1f} points): {off} of {len(mm)} cells lie more than "
                   "2 SE from chance.")
    return out


def markdown(cells: dict, knobs: Knobs, model_name: str, wall_s: float, n_layers: int = 0,
             command: Optional[str] = None) -> str:
    steps = -(-knobs.tokens // (knobs.micro_batch * knobs.grad_accum * knobs.seq_len))
    lines = [f"## Recovery at equal token budgets: {model_name} (`{knobs.preset}` preset)", "",
             f"_{stamp()}; {len(cells)} cells, {sum(c.get('wall_s', 0.0) for c in cells.values()) / 60:.1f} min of "
             f"cell compute summed (this invocation {wall_s / 60:.1f} min wall; finished cells are reused)._", "",
             f"Recovery on {knobs.data} train, {knobs.tokens:,} tokens each ({steps} steps x {knobs.micro_batch} x "
             f"{knobs.seq_len}) through transformers' Trainer; KD from the unpruned model; partial = LM head + last "
             f"{knobs.last_k} blocks. PPL: 128-token chunks ({knobs.eval_chunks or 'all'} per corpus); zero-shot: "
             f"7-task mean over {knobs.zs_limit or 'all'} items per task"
             + (f"; MMLU (lm-eval's formulation, accuracy %): {knobs.mmlu_limit or 'all'} test question(s) per subject "
                "x 57 subjects" + ("" if set(RECOVERIES) <= set(knobs.mmlu_recoveries) else
                                   f", on the cells of recoveries {', '.join(knobs.mmlu_recoveries)} only") + ". "
                if knobs.mmlu_shots else "; no MMLU in this run. ")
             + "Regenerate: `" + (command or f"python benchmarks/recovery_experiment.py --model {model_name} --preset "
                                f"{knobs.preset}" + ("" if knobs.ratio_of == "params" else
                                                     f" --ratio-of {knobs.ratio_of}")) + "`. Ratios are of "
             + ("all parameters." if knobs.ratio_of == "params" else
                "the decoder blocks' parameters ('removed' is of all parameters)."), "",
             "| criterion | removed | recovery | WikiText-2 PPL | PTB PPL | 7-task mean "
             + "".join(f"| MMLU {k}-shot " for k in knobs.mmlu_shots) + "| held-out PPL before → after |",
             "|---|---|---|---|---|---|" + "---|" * len(knobs.mmlu_shots) + "---|"]
    for c in cells.values():
        rt = c.get("retrain")
        ho = f"{rt['heldout_ppl_before']:.1f} → {rt['heldout_ppl_after']:.1f}" if rt else ""
        removed = ("—" if c["criterion"] == "base"
                   else f"{100 * c['removed_fraction']:.1f}% ({len(c['removed'])} blocks)")
        lines.append(f"| {LABEL[c['criterion']]} | {removed} | {c['recovery']} | {c['ppl_wikitext2']:.2f} | "
                     f"{c['ppl_ptb']:.2f} | {c['zeroshot']['mean']:.3f} | "
                     + "".join(f"{100 * c['mmlu'][str(k)]['acc']:.1f} | " if str(k) in c.get("mmlu", {}) else "— | "
                               for k in knobs.mmlu_shots) + f"{ho} |")
    if n_layers:
        lines += ["", "Findings (computed from the cells above):", ""] + [f"- {x}" for x in findings(cells, n_layers)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or local HF checkpoint dir")
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--ratios", default="0.2,0.35")
    ap.add_argument("--recoveries", default=",".join(RECOVERIES))
    ap.add_argument("--out", default=None, help="cell folder (default benchmarks/results/recovery_<model>/)")
    ap.add_argument("--ratio-of", choices=("params", "blocks"), default="params",
                    help="ratios as a share of all parameters (default) or of the decoder blocks' parameters")
    ap.add_argument("--mmlu-shots", default=None,
                    help="comma-separated MMLU shot counts to run, e.g. '0' or '' for none (default: the preset's)")
    ap.add_argument("--mmlu-recoveries", default=None,
                    help="comma-separated recoveries whose cells get MMLU (default: all; 'none' includes the "
                         "unpruned model), e.g. 'none' to add MMLU to a finished grid's unrecovered cells only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None, help="shared data folder (default $SHORTLLM_DATA)")
    ap.add_argument("--report-only", action="store_true", help="render the report from the finished cells only")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.data_dir:
        os.environ["SHORTLLM_DATA"] = a.data_dir
    criteria = [c.strip() for c in a.criteria.split(",") if c.strip()]
    recoveries = [m.strip() for m in a.recoveries.split(",") if m.strip()]
    mmlu_recs = None if a.mmlu_recoveries is None else [m.strip() for m in a.mmlu_recoveries.split(",") if m.strip()]
    bad = sorted(set(criteria) - set(CRITERIA)) + sorted(set(recoveries + (mmlu_recs or [])) - set(RECOVERIES))
    if bad:
        raise DataError(f"Unknown criteria/recoveries {bad}; use {CRITERIA} and {RECOVERIES}.")
    ratios = [float(r) for r in a.ratios.split(",")]
    knobs = Knobs(preset=a.preset, **PRESETS[a.preset], ratio_of=a.ratio_of)
    if a.mmlu_shots is not None:
        knobs.mmlu_shots = tuple(int(x) for x in a.mmlu_shots.split(",") if x.strip())
    if mmlu_recs is not None:
        if not knobs.mmlu_shots:
            raise UsageError("--mmlu-recoveries applies only with MMLU shots (this run has --mmlu-shots '').")
        knobs.mmlu_recoveries = tuple(mmlu_recs)
    name = Path(a.model).name if Path(a.model).is_dir() else a.model
    out = Path(a.out) if a.out else HERE / "results" / f"recovery_{name}"
    from shortllm.model.loading import load_model

    model, tok = load_model(a.model)
    t0 = time.perf_counter()
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    cells = run(model, tok, knobs, criteria, ratios, recoveries, out, a.data_dir, progress=not a.quiet, log=log,
                compute=not a.report_only)
    wall = time.perf_counter() - t0
    res = HERE / "results"
    atomic_write_text(res / f"recovery_{name}.json", json.dumps(
        {"stamp": stamp_dict(), "model": a.model, "knobs": dataclasses.asdict(knobs), "wall_s": wall,
         "cells": cells}, indent=1))
    cmd = " ".join(["python benchmarks/recovery_experiment.py"] + [shlex.quote(x) for x in (
        sys.argv[1:] if argv is None else argv) if x not in ("--report-only", "--quiet")])
    write_report(res / f"recovery_{name}.md", markdown(cells, knobs, name, wall, int(model.config.num_hidden_layers),
                                                       command=cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
