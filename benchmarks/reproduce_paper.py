"""Reproduce the seed papers' depth-pruning experiment on SmolLM2-135M, resumably, from one command.

Design (fixed; presets only cut samples): criteria {BI, Taylor+, Mag+, PPL, iterative PPL (SLEB)} x
removal {20 %, 35 % of the parameters} x recovery {none, LoRA, CPT}, plus the unpruned baseline.
Metrics: WikiText-2 (test) and PTB (validation) perplexity, 128-token LLM-Pruner protocol (first
``eval_chunks`` chunks), and the 7-task zero-shot average (first ``zs_limit`` items per task).
LoRA and CPT train on PTB *train* (disjoint from both evaluation splits) with the same token budget
(steps x micro-batch x seq_len), each with its seed default LR (LoRA 1e-4, CPT 5e-5).

    python benchmarks/reproduce_paper.py --preset smoke          # writes benchmarks/results/reproduce.md

Every cell's result is one JSON file under ``--out`` (written atomically); a rerun skips finished cells
whose knobs match. The one-pass scores (bi/taylor/mag/ppl) and the SLEB removal order are cached there
too. ``--report-only`` re-renders the Markdown and plots from whatever cells exist.

Time on this machine (2 cores, fp32). Smoke, with the cores shared with other jobs and ``--threads 1``
(3-4x faster than 2 threads on a loaded box): ~40 min wall. Full, quiet machine, ``--threads 2``: one-pass
scoring 60 s, SLEB search (13 rounds) ~7 min, an unretrained cell ~60 s (its evaluation), a LoRA/CPT cell
~2.5 min, so ~70 min for all 31 cells (measured on the first 22). Small lies between the two.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from shortllm.errors import DataError  # noqa: E402
from shortllm.io.atomic import atomic_write_text  # noqa: E402

CRITERIA = ("bi", "taylor", "mag", "ppl", "sleb")
LABEL = {"bi": "BI (ShortGPT)", "taylor": "Taylor+", "mag": "Mag+", "ppl": "PPL", "sleb": "Iterative PPL (SLEB)",
         "base": "Unpruned"}
RECOVERIES = ("none", "lora", "cpt")
EVAL_CORPORA = ("wikitext2", "ptb")
CELL_FORMAT = "shortllm.reproduce/1"


@dataclass
class Knobs:
    """Every setting that changes a number. Cells record these; a cell with other knobs is recomputed."""

    preset: str = "smoke"
    calib_corpus: str = "wikitext2"
    calib_samples: int = 4
    calib_seq_len: int = 128
    calib_batch: int = 4
    eval_chunks: Optional[int] = 8
    eval_seq_len: int = 128
    eval_batch: int = 8
    zs_limit: Optional[int] = 20
    zs_batch: int = 16
    retrain_steps: int = 8
    retrain_micro_batch: int = 2
    retrain_seq_len: int = 128
    retrain_eval_examples: int = 8
    retrain_data: str = "ptb"
    # cells retrained by the hand-written loop (before transformers' Trainer) do not count as done
    retrain_engine: str = "transformers.Trainer"
    ratios: tuple = (0.2, 0.35)
    protect_plus: tuple = (4, 2)
    criteria: tuple = CRITERIA
    recoveries: tuple = RECOVERIES
    seed: int = 0

    def calib_key(self) -> str:
        return f"{self.calib_corpus}_n{self.calib_samples}_t{self.calib_seq_len}_b{self.calib_batch}_s{self.seed}"

    def cell_knobs(self, recovery: str) -> dict:
        """The knobs a cell's numbers depend on (so changing retrain steps does not redo 'none' cells)."""
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("preset", "criteria", "recoveries", "ratios")}
        d = json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON
        if recovery == "none":
            d = {k: v for k, v in d.items() if not k.startswith("retrain_")}
        return d


PRESETS = {
    # calibration samples x 128 tok, eval chunks x 128 tok per corpus, zero-shot items per task, retrain steps
    # x micro-batch x 128 tok. "full" is the issue's <= 2 h target cut (samples cut, the design never).
    "smoke": dict(calib_samples=4, eval_chunks=8, zs_limit=20, retrain_steps=8, retrain_micro_batch=2,
                  retrain_eval_examples=8),
    "small": dict(calib_samples=8, eval_chunks=16, zs_limit=30, retrain_steps=16, retrain_micro_batch=4,
                  retrain_eval_examples=16),
    "full": dict(calib_samples=10, eval_chunks=32, zs_limit=50, retrain_steps=32, retrain_micro_batch=4,
                 retrain_eval_examples=32),
}


def knobs_from_preset(preset: str, **overrides) -> Knobs:
    if preset not in PRESETS:
        raise DataError(f"Unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    base = dict(PRESETS[preset], preset=preset)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Knobs(**base)


# ---------------------------------------------------------------- helpers
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


class _Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def eval_texts(tok, knobs: Knobs, data_dir=None) -> dict[str, str]:
    """Each eval corpus's joined text, cut to a prefix that tokenises to the same first
    eval_chunks x seq_len tokens as the whole split (checked), so no cell re-tokenises megabytes."""
    from shortllm.evaluation.corpus_ppl import PROTOCOLS, corpus_text

    out = {}
    for c in EVAL_CORPORA:
        text, _ = corpus_text(c, "llm-pruner", data_dir=data_dir)
        if knobs.eval_chunks is None:
            out[c] = text
            continue
        need = knobs.eval_chunks * knobs.eval_seq_len
        full = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        cut = text.rfind(" ", 0, min(len(text), need * 24))  # ~24 chars/token bound, cut before a space
        prefix = text[:cut] if cut > 0 else text
        ids = tok(prefix, add_special_tokens=False, verbose=False)["input_ids"]
        same = len(ids) >= need + 1 and ids[:need] == full[:need]
        out[c] = prefix if same else text
    assert PROTOCOLS["llm-pruner"]["seq_len"] == 128, "the seed protocol is 128-token chunks"
    return out


def evaluate_model(model, tok, texts: dict[str, str], knobs: Knobs, data_dir=None) -> dict:
    """PPL on both corpora, then the 7 zero-shot tasks through lm-eval-harness (`harness_eval`, first
    zs_limit items each). Per task the cell keeps acc, acc_norm (None for BoolQ: lm-eval reports only acc
    there), their stderrs, n and the reported metric/score (acc for BoolQ/PIQA/WinoGrande/ARC-e, acc_norm
    for HellaSwag/ARC-c/OBQA)."""
    from shortllm.evaluation.corpus_ppl import perplexity
    from shortllm.evaluation.harness import SEVEN, harness_eval

    res = {}
    for c in EVAL_CORPORA:
        p = perplexity(model, tok, texts[c], seq_len=knobs.eval_seq_len, max_chunks=knobs.eval_chunks,
                       batch_size=knobs.eval_batch, progress=False)
        res[f"ppl_{c}"] = p.ppl
        res[f"ppl_{c}_tokens"] = p.n_tokens
        res["ppl_bos_policy"] = p.settings["bos_policy"]  # which BOS policy the numbers were taken with
    h = harness_eval(model, tok, SEVEN, limit=knobs.zs_limit, batch_size=knobs.zs_batch, data_dir=data_dir)
    res["zeroshot"] = {name: {f: h.tasks[name].get(f) for f in ("acc", "acc_norm", "n", "metric", "score",
                                                                "acc_stderr", "acc_norm_stderr")} for name in SEVEN}
    res["zs_mean"] = h.mean
    res["zs_engine"] = f"lm-eval-harness {h.settings['lm_eval']}"
    return res


# ---------------------------------------------------------------- cached scoring
def cached_scores(model, calib, out: Path, knobs: Knobs, progress: bool):
    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.scores import Scores

    path = out / f"scores_{knobs.calib_key()}.json"
    timing = out / f"scores_{knobs.calib_key()}.time.json"
    if path.exists() and timing.exists():
        return Scores.load(path, model=model), _read_json(timing)
    with _Clock() as clk:
        scores = score_fast(model, calib, metrics=("bi", "taylor", "mag", "ppl"), progress=progress)
    scores.save(path)
    t = {"wall_s": clk.wall, "cpu_s": clk.cpu}
    _write_json(timing, t)
    return scores, t


def cached_sleb(model, calib, n_remove: int, out: Path, knobs: Knobs, progress: bool) -> tuple[list[int], dict]:
    from shortllm.scoring.search import iterative

    path = out / f"sleb_{knobs.calib_key()}.json"
    raw = _read_json(path)
    if raw and len(raw.get("order", [])) >= n_remove:
        return [int(x) for x in raw["order"]], raw["time"]
    with _Clock() as clk:
        res = iterative(model, calib, n_remove, protect=(0, 0), progress=progress)
    d = res.to_dict()
    d["time"] = {"wall_s": clk.wall, "cpu_s": clk.cpu}
    _write_json(path, d)
    return [int(x) for x in res.order], d["time"]


def make_plans(model, scores, sleb_order: Optional[list[int]], knobs: Knobs) -> dict:
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.sizes import blocks_for_ratio, count_params

    plans = {}
    for r in knobs.ratios:
        for c in knobs.criteria:
            if c == "sleb" and sleb_order is None:
                continue
            if c == "sleb":
                blocks = get_adapter(model).blocks()
                k = blocks_for_ratio(float(r), sleb_order, [count_params(b) for b in blocks], count_params(model))
                plans[(c, r)] = make_plan(None, model=model, blocks=sleb_order[:k])
                plans[(c, r)].metric = "ppl-iterative"
            else:
                prot = tuple(knobs.protect_plus) if c in ("taylor", "mag") else (0, 0)
                plans[(c, r)] = make_plan(scores, c, model=model, ratio=float(r), protect=prot)
    return plans


def sleb_blocks_needed(model, knobs: Knobs) -> int:
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.sizes import blocks_for_ratio, count_params

    bp = [count_params(b) for b in get_adapter(model).blocks()]
    order = sorted(range(len(bp)), key=lambda i: bp[i])  # the most blocks any removal order could need
    return max(blocks_for_ratio(float(r), order, bp, count_params(model)) for r in knobs.ratios)


# ---------------------------------------------------------------- the experiment
def cell_list(knobs: Knobs) -> list[tuple[str, Optional[float], str]]:
    """All cells in run order: baseline, unrecovered, recovery at the severe ratio (finding (c)), the rest;
    SLEB (the slowest search) late in each group, so an interrupted run has the most findings."""
    cells = [("base", None, "none")] + [(c, r, rec) for r in knobs.ratios for c in knobs.criteria
                                        for rec in knobs.recoveries]
    sev = max(knobs.ratios)

    def rank(cell):
        c, r, rec = cell
        group = 0 if c == "base" else 1 if rec == "none" else 2 if r == sev else 3
        return (group, c == "sleb" and group < 3, -(r or 0), CRITERIA.index(c) if c in CRITERIA else -1)
    return sorted(cells, key=rank)


def cell_key(crit: str, ratio: Optional[float], rec: str) -> str:
    return "base" if crit == "base" else f"{crit}_r{int(round(ratio * 100)):02d}_{rec}"


def run_experiment(model, tok, knobs: Knobs, out_dir, *, data_dir=None, progress: bool = True,
                   retrain_data=None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Compute every missing cell under `out_dir` (cells/*.json) and return {key: cell dict}.

    `model`/`tok` are injectable (tests pass a tiny model); `retrain_data` overrides knobs.retrain_data
    (a RetrainData or a corpus name/path for `shortllm.retrain_data.load_retrain_data`).
    """
    from shortllm.data.calibration import calibration_loader
    from shortllm.pruning.removal import prune
    from shortllm.pruning.sizes import count_params
    from shortllm.retrain.config import RetrainConfig
    from shortllm.retrain.train_data import RetrainData, load_retrain_data
    from shortllm.retrain.training import retrain_model as retrain

    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    model.eval()
    cells = cell_list(knobs)
    todo = []
    for crit, r, rec in cells:
        old = _read_json(out / "cells" / f"{cell_key(crit, r, rec)}.json")
        if not (old and old.get("format") == CELL_FORMAT and old.get("knobs") == knobs.cell_knobs(rec)):
            todo.append((crit, r, rec))
    log(f"{len(cells) - len(todo)} of {len(cells)} cells already done")
    if todo:
        # the calibration loader reads $SHORTLLM_DATA (main() sets it from --data-dir)
        calib = calibration_loader(knobs.calib_corpus, tok, n_samples=knobs.calib_samples,
                                   seq_len=knobs.calib_seq_len, batch_size=knobs.calib_batch, seed=knobs.seed)
        scores, st = cached_scores(model, calib, out, knobs, progress)
        plans = make_plans(model, scores, None, knobs)
        texts = eval_texts(tok, knobs, data_dir)
    rdata = None
    total = count_params(model)
    for crit, r, rec in tqdm(todo, desc="reproduce cells", unit="cell", disable=not progress):
        key = cell_key(crit, r, rec)
        with _Clock() as clk:
            cell = {"format": CELL_FORMAT, "key": key, "criterion": crit, "ratio": r, "recovery": rec,
                    "knobs": knobs.cell_knobs(rec)}
            if crit == "base":
                m = model
                cell.update(removed=[], params=total, params_before=total)
            else:
                if (crit, r) not in plans:  # SLEB is searched only when its first cell comes up
                    order, _ = cached_sleb(model, calib, sleb_blocks_needed(model, knobs), out, knobs, progress)
                    plans.update(make_plans(model, scores, order, knobs))
                plan = plans[(crit, r)]
                cell.update(removed=list(plan.removed), params=plan.params_after, params_before=plan.params_before,
                            protect=list(plan.protect))
                m = prune(model, plan, inplace=False)
            if rec != "none":
                if rdata is None:
                    src = retrain_data if retrain_data is not None else knobs.retrain_data
                    rdata = src if isinstance(src, RetrainData) else load_retrain_data(
                        src, tok, knobs.retrain_seq_len, 0.05, data_dir)
                cfg = RetrainConfig(method=rec, steps=knobs.retrain_steps, micro_batch_size=knobs.retrain_micro_batch,
                                    seq_len=knobs.retrain_seq_len, eval_max_examples=knobs.retrain_eval_examples,
                                    seed=knobs.seed)
                rr = retrain(m, tok, rdata, cfg, progress=False)
                m = rr.model
                m.eval()
                cell["retrain"] = {"source": rdata.source, "tokens_seen": rr.tokens_seen, "lr": cfg.resolved_lr,
                                   "heldout_ppl_before": rr.ppl_before, "heldout_ppl_after": rr.ppl_after,
                                   "final_loss": rr.losses[-1] if rr.losses else None}
            cell.update(evaluate_model(m, tok, texts, knobs, data_dir))
            del m
        cell["time"] = {"wall_s": clk.wall, "cpu_s": clk.cpu}
        _write_json(out / "cells" / f"{key}.json", cell)
        log(f"{key}: wiki2 {cell['ppl_wikitext2']:.2f} ptb {cell['ppl_ptb']:.2f} zs {cell['zs_mean']:.3f} "
            f"({clk.wall:.0f}s)")
    return load_cells(out, knobs)


def load_cells(out, knobs: Knobs) -> dict:
    cells = {}
    for crit, r, rec in cell_list(knobs):
        c = _read_json(Path(out) / "cells" / f"{cell_key(crit, r, rec)}.json")
        if c and c.get("format") == CELL_FORMAT and c.get("knobs") == knobs.cell_knobs(rec):
            cells[c["key"]] = c
    return cells


# ---------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke")
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or local HF checkpoint dir")
    ap.add_argument("--out", default=str(HERE / "results" / "reproduce"), help="cell/cache directory")
    ap.add_argument("--report", default=str(HERE / "results" / "reproduce.md"), help="Markdown report path")
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--eval-chunks", type=int, help="128-token chunks per PPL corpus (0 = all)")
    ap.add_argument("--zs-limit", type=int, help="items per zero-shot task (0 = all)")
    ap.add_argument("--retrain-steps", type=int)
    ap.add_argument("--retrain-micro-batch", type=int)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--data-dir", help="shared data folder (default: $SHORTLLM_DATA)")
    ap.add_argument("--report-only", action="store_true", help="only re-render the report from finished cells")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.data_dir:
        os.environ["SHORTLLM_DATA"] = a.data_dir
    knobs = knobs_from_preset(a.preset, calib_samples=a.calib_samples, retrain_steps=a.retrain_steps,
                              retrain_micro_batch=a.retrain_micro_batch)
    if a.eval_chunks is not None:
        knobs.eval_chunks = a.eval_chunks or None
    if a.zs_limit is not None:
        knobs.zs_limit = a.zs_limit or None
    from _reproduce_report import write_report

    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if not a.report_only:
        from shortllm.model.loading import load_model

        model, tok = load_model(a.model)
        run_experiment(model, tok, knobs, a.out, data_dir=a.data_dir, progress=not a.quiet, log=log)
    path = write_report(a.out, a.report, knobs, model_name=a.model)
    log(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
