"""Report tables of `shortllm eval`: perplexity and zero-shot results as Markdown."""
from __future__ import annotations


def ppl_table(rows: list[dict]) -> list[str]:
    """Markdown lines of a perplexity table, one row per `PerplexityResult.to_dict()`."""
    lines = ["| dataset | split | protocol | seq_len | BOS | chunks | tokens | PPL | time (s) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["settings"]
        lines.append(f"| {s['dataset']} | {s.get('split', '-')} | {s['protocol']} | {s['seq_len']} | {s['bos']} | "
                     f"{s['n_chunks']} | {r['n_tokens']} | {r['ppl']:.3f} | {s['seconds']:.0f} |")
    return lines


def zeroshot_table(tasks: dict) -> list[str]:
    """Markdown lines of a zero-shot table (task name -> `TaskResult` dict) ending with the mean row."""
    lines = ["| task | n | acc | acc_norm | reported | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, t in tasks.items():
        lines.append(f"| {name} | {t['n']} | {100 * t['acc']:.2f} ± {100 * t['acc_stderr']:.2f} | "
                     f"{100 * t['acc_norm']:.2f} ± {100 * t['acc_norm_stderr']:.2f} | "
                     f"{100 * t['score']:.2f} ({t['metric']}) | {t['seconds']:.0f} |")
    mean = sum(t["score"] for t in tasks.values()) / len(tasks)
    return lines + [f"| **mean of {len(tasks)}** | | | | **{100 * mean:.2f}** | |"]


def render_markdown(report: dict) -> str:
    """The Markdown table of an eval report (the JSON written by ``shortllm eval``)."""
    versions = " · ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [f"# Evaluation of `{report['model']}`", "", f"{report['date']} · dtype {report['dtype']} · {versions}", ""]
    if report.get("perplexity"):
        lines += ppl_table(report["perplexity"]) + [""]
    zs = report.get("zeroshot")
    if zs:
        lim = zs["settings"].get("limit")
        lines += zeroshot_table(zs["tasks"]) + [
            "", f"Zero-shot: lm-eval-harness 0.4 semantics, "
                f"{'first ' + str(lim) + ' items per task' if lim else 'full splits'}."]
    return "\n".join(lines) + "\n"
