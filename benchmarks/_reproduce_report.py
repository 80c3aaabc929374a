"""Render benchmarks/reproduce_paper.py's cells: the seed-paper-style table, two plots, and the findings
computed from the numbers (never hand-written)."""
from __future__ import annotations

import glob
import json
import math
import statistics
from pathlib import Path

from reproduce_paper import CRITERIA, LABEL, RECOVERIES, Knobs, cell_key, cell_list, load_cells

from shortllm.io.atomic import atomic_path, atomic_write_text

TASK_ORDER = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_HEAD = ("BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA")


def _f(x, nd=2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _task(cell: dict, name: str):
    for k, v in cell.get("zeroshot", {}).items():
        if k == name or k.replace("-", "_") == name:
            return v["score"]
    return None


def _zs_se(cell: dict) -> float:
    """Standard error of the 7-task mean (tasks independent)."""
    z = cell.get("zeroshot", {})
    ses = [v["acc_stderr"] if v["metric"] == "acc" else v["acc_norm_stderr"] for v in z.values()]
    return math.sqrt(sum(s * s for s in ses if s is not None and math.isfinite(s))) / max(1, len(ses))


def table(cells: dict, knobs: Knobs) -> str:
    head = ["Criterion", "Ratio", "Recovery", "#Params", "Removed blocks", "WikiText-2 PPL↓", "PTB PPL↓",
            *TASK_HEAD, "Avg↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def seed_order(cell):  # the seed table: baseline, then per ratio each criterion with its recoveries
        c, r, rec = cell
        return (r or 0, CRITERIA.index(c) if c in CRITERIA else -1, RECOVERIES.index(rec))
    for crit, r, rec in sorted(cell_list(knobs), key=seed_order):
        key = cell_key(crit, r, rec)
        c = cells.get(key)
        lead = [LABEL[crit], "0%" if r is None else f"{r:.0%}", rec]
        if c is None:
            lines.append("| " + " | ".join(lead + ["(not run)"] + [""] * (len(head) - 4)) + " |")
            continue
        cut = 1 - c["params"] / c["params_before"]
        row = lead + [f"{c['params'] / 1e6:.1f}M" + (f" (−{cut:.1%})" if cut else ""),
                      ",".join(map(str, c["removed"])) or "—", _f(c["ppl_wikitext2"]), _f(c["ppl_ptb"])]
        row += [_f(None if _task(c, t) is None else 100 * _task(c, t), 1) for t in TASK_ORDER]
        row.append(_f(100 * c["zs_mean"], 1))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _scores(out: Path, knobs: Knobs):
    from shortllm.scoring.scores import Scores

    p = out / f"scores_{knobs.calib_key()}.json"
    return Scores.load(p) if p.exists() else None


def findings(cells: dict, knobs: Knobs, scores) -> list[str]:
    out = []
    se = statistics.mean(_zs_se(c) for c in cells.values()) if cells else float("nan")
    # (a) PPL best on perplexity; Taylor+ competitive on zero-shot
    for r in knobs.ratios:
        row = {c: cells.get(cell_key(c, r, "none")) for c in knobs.criteria}
        row = {c: v for c, v in row.items() if v}
        if len(row) < 2:
            out.append(f"(a) {r:.0%}: not enough unrecovered cells yet.")
            continue
        best_w = min(row, key=lambda c: row[c]["ppl_wikitext2"])
        best_p = min(row, key=lambda c: row[c]["ppl_ptb"])
        best_z = max(row, key=lambda c: row[c]["zs_mean"])
        ppl_holds = best_w in ("ppl", "sleb") and best_p in ("ppl", "sleb")
        rank = sorted(row, key=lambda c: -row[c]["zs_mean"])
        tz = row.get("taylor")
        gap = None if tz is None else 100 * (row[best_z]["zs_mean"] - tz["zs_mean"])
        comp = tz is not None and gap <= 2 * 100 * se
        out.append(
            f"(a) {r:.0%}, no recovery"
            + ("" if len(row) == len(knobs.criteria) else f" (PARTIAL: {len(row)}/{len(knobs.criteria)} criteria run)")
            + f": lowest WikiText-2 PPL = {LABEL[best_w]} ({row[best_w]['ppl_wikitext2']:.2f}), "
            f"lowest PTB PPL = {LABEL[best_p]} ({row[best_p]['ppl_ptb']:.2f}) → PPL-criterion-best-on-perplexity "
            f"**{'holds' if ppl_holds else 'does not hold'}**. Best zero-shot avg = {LABEL[best_z]} "
            f"({100 * row[best_z]['zs_mean']:.1f}); Taylor+ "
            + ("not run" if tz is None else f"{100 * tz['zs_mean']:.1f} (rank {rank.index('taylor') + 1}/{len(rank)}, "
               f"{gap:.1f} pt behind; 2×SE of an average here ≈ {200 * se:.1f} pt) → Taylor+ competitive "
               f"**{'holds' if comp else 'does not hold'}**."))
    # (b) deeper blocks less important
    if scores is not None:
        for m in ("bi", "ppl", "taylor"):
            if m not in scores.values:
                continue
            v = scores.per_block(m).tolist()
            L = len(v)
            third = sorted(range(L), key=lambda i: v[i])[: max(1, L // 3)]
            rest = [i for i in range(L) if i not in third]
            mi, mr = statistics.mean(third), statistics.mean(rest)
            rho = _spearman(list(range(L)), v)
            # both tests must agree: the third's mean index deeper AND scores falling with depth
            verdict = ("holds" if mi > mr and rho < 0 else "does not hold" if mi <= mr and rho >= 0 else
                       "is mixed (the two tests disagree)")
            out.append(f"(b) {m.upper()}: least-important third = blocks {sorted(third)}, mean index {mi:.1f} vs "
                       f"{mr:.1f} for the rest; Spearman(index, score) = {rho:+.2f} → deeper-is-less-important "
                       f"**{verdict}** for {m.upper()}.")
    # (c) CPT > LoRA at the severe ratio
    sev = max(knobs.ratios)
    wins, total, parts = 0, 0, []
    for c in knobs.criteria:
        lo, cp, no = (cells.get(cell_key(c, sev, x)) for x in ("lora", "cpt", "none"))
        if not (lo and cp and no):
            continue
        total += 1
        wins += cp["ppl_wikitext2"] < lo["ppl_wikitext2"]
        parts.append(f"{LABEL[c]}: none {no['ppl_wikitext2']:.1f} → LoRA {lo['ppl_wikitext2']:.1f} / CPT "
                     f"{cp['ppl_wikitext2']:.1f} (avg {100 * lo['zs_mean']:.1f} / {100 * cp['zs_mean']:.1f})")
    if total:
        part = "" if total == len(knobs.criteria) else f" (PARTIAL: {total}/{len(knobs.criteria)} criteria run)"
        out.append(f"(c) {sev:.0%}{part}: CPT reaches lower WikiText-2 PPL than LoRA for {wins}/{total} criteria "
                   f"(equal token budgets) → CPT-recovers-more **{'holds' if wins * 2 > total else 'does not hold'}**. "
                   + "; ".join(parts) + ".")
    else:
        out.append(f"(c) {sev:.0%}: recovery cells not run yet.")
    return out


def _spearman(x, y) -> float:
    def ranks(a):
        o = sorted(range(len(a)), key=lambda i: a[i])
        r = [0.0] * len(a)
        for k, i in enumerate(o):
            r[i] = float(k)
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else float("nan")


def plot_ppl(cells: dict, knobs: Knobs, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = cells.get("base")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, corpus in zip(axes, ("wikitext2", "ptb")):
        for c in knobs.criteria:
            for rec, style in (("none", "-o"), ("cpt", "--s"), ("lora", ":^")):
                pts = [(0.0, base[f"ppl_{corpus}"])] if base else []
                pts += [(1 - cells[k]["params"] / cells[k]["params_before"], cells[k][f"ppl_{corpus}"])
                        for r in knobs.ratios if (k := cell_key(c, r, rec)) in cells]
                if len(pts) > 1 and rec in knobs.recoveries:
                    xs, ys = zip(*sorted(pts))
                    ax.plot([100 * x for x in xs], ys, style, label=f"{LABEL[c]} ({rec})",
                            alpha=1 if rec == "none" else .6)
        ax.set_yscale("log")
        ax.set_xlabel("removed parameters (%)")
        ax.set_ylabel(f"{corpus} PPL (128-token chunks)")
        ax.grid(alpha=.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("Perplexity vs removed parameters per criterion", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_profile(scores, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mets = [m for m in ("bi", "taylor", "ppl") if m in scores.values]
    fig, axes = plt.subplots(len(mets), 1, figsize=(8, 2.2 * len(mets)), squeeze=False)
    for ax, m in zip(axes[:, 0], mets):
        v = scores.per_block(m).tolist()
        ax.bar(range(len(v)), v, color="tab:blue")
        if m == "ppl":
            ax.set_yscale("log")
        ax.set_ylabel({"bi": "BI", "taylor": "Taylor", "ppl": "PPL w/o block"}[m])
        ax.set_xlim(-0.5, len(v) - 0.5)
    axes[-1, 0].set_xlabel("block (lower score = less important)")
    fig.suptitle("Per-block importance profile (one streaming pass)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def _totals(out: Path, cells: dict) -> tuple[float, float]:
    w = sum(c["time"]["wall_s"] for c in cells.values())
    u = sum(c["time"]["cpu_s"] for c in cells.values())
    # the SLEB search runs inside its first cell's clock, so only the scoring pass is added here
    for p in glob.glob(str(out / "scores_*.time.json")):
        t = json.loads(Path(p).read_text())
        t = t.get("time", t)
        w, u = w + t.get("wall_s", 0), u + t.get("cpu_s", 0)
    return w, u


def write_report(out_dir, report_path, knobs: Knobs, model_name: str = "smollm2-135m") -> Path:
    from _common import stamp

    out, report = Path(out_dir), Path(report_path)
    cells = load_cells(out, knobs)
    scores = _scores(out, knobs)
    stem = report.with_suffix("")
    ppl_png, prof_png = Path(f"{stem}_ppl.png"), Path(f"{stem}_profile.png")
    if cells:
        plot_ppl(cells, knobs, ppl_png)
    if scores is not None:
        plot_profile(scores, prof_png)
    n_all = len(cell_list(knobs))
    wall, cpu = _totals(out, cells)
    k = knobs
    lines = [
        f"# Depth-pruning experiment on {model_name} (seed papers reproduced)", "",
        f"- Run: {stamp()}",
        f"- Preset **{k.preset}**: calibration {k.calib_samples}×{k.calib_seq_len} tokens of {k.calib_corpus} "
        f"(seed {k.seed}); PPL on the first {k.eval_chunks or 'all'} {k.eval_seq_len}-token chunks (LLM-Pruner "
        f"protocol, no BOS) of WikiText-2 test and PTB validation; zero-shot first {k.zs_limit or 'all'} items per "
        f"task; LoRA and CPT {k.retrain_steps} steps × {k.retrain_micro_batch} × {k.retrain_seq_len} tokens "
        f"(= {k.retrain_steps * k.retrain_micro_batch * k.retrain_seq_len} tokens each) on {k.retrain_data} train; "
        f"Taylor+/Mag+ protect {tuple(k.protect_plus)}.",
        f"- Cells finished: {len(cells)}/{n_all}. Compute summed over cells + scoring + SLEB: wall "
        f"{wall / 60:.1f} min, CPU {cpu / 60:.1f} min (process time, all threads; the SLEB search is inside its "
        "first cell's time).",
        "- Ratio = share of all parameters (embeddings included) removed, rounded to whole blocks.",
        "- Command: `python benchmarks/reproduce_paper.py --preset " + k.preset + "` (resumable; `--threads 1` on a "
        "shared box).", "",
        table(cells, k), "",
        f"![PPL vs removed parameters]({ppl_png.name})  ![per-block profile]({prof_png.name})", "",
        "## Which seed findings hold (computed from the table)", "",
    ]
    lines += [f"- {s}" for s in findings(cells, k, scores)]
    lines += ["", f"With {k.zs_limit or 'all'} items per task the zero-shot averages carry a standard error of a few "
              "points; differences smaller than ~2 SE are noise at this preset."]
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
