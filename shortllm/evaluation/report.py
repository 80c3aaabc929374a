"""Report tables of `shortllm eval`: perplexity and lm-eval results as Markdown."""
from __future__ import annotations


def ppl_table(rows: list[dict]) -> list[str]:
    """Markdown lines of a perplexity table, one row per `PerplexityResult.to_dict()`."""
    lines = ["| dataset | split | protocol | seq_len | BOS | chunks | tokens | PPL | time (s) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["settings"]
        lines.append(f"| {s['dataset']} | {s.get('split', '-')} | {s['protocol']} | {s['seq_len']} | {s['bos']} | "
                     f"{s['n_chunks']} | {r['n_tokens']} | {r['ppl']:.3f} | {s['seconds']:.0f} |")
    policies = sorted({r["settings"].get("bos_policy") for r in rows if r["settings"].get("bos_policy")})
    return lines + ["", *(f"BOS policy: {p}." for p in policies)] if policies else lines


def zeroshot_table(tasks: dict) -> list[str]:
    """Markdown lines of a zero-shot table (task name -> a `HarnessResult.tasks` entry with ``seconds``)
    ending with the mean row."""
    lines = ["| task | n | acc | acc_norm | reported | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, t in tasks.items():
        lines.append(f"| {name} | {t['n']} | {_pm(t, 'acc')} | {_pm(t, 'acc_norm')} | "
                     f"{100 * t['score']:.2f} ({t['metric']}) | {t.get('seconds', 0):.0f} |")
    mean = sum(t["score"] for t in tasks.values()) / len(tasks)
    return lines + [f"| **mean of {len(tasks)}** | | | | **{100 * mean:.2f}** | |"]


def render_markdown(report: dict) -> str:
    """The Markdown table of an eval report (the JSON written by ``shortllm eval``)."""
    versions = " · ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [f"# Evaluation of `{report['model']}`", "", f"{report['date']} · dtype {report['dtype']} · {versions}", ""]
    if report.get("perplexity"):
        lines += ppl_table(report["perplexity"]) + [""]
    if report.get("harness"):
        lines += harness_table(report["harness"]) + [""]
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _pm(t: dict, metric: str) -> str:
    v, e = t.get(metric), t.get(f"{metric}_stderr")
    return _pct(v) + (f" ± {100 * e:.2f}" if isinstance(e, float) else "")


def harness_table(res: dict) -> list[str]:
    """Markdown lines of an lm-eval run (`HarnessResult.to_dict()`): one row per task, the 7-task mean,
    LAMBADA's perplexity, MMLU's categories, the settings (BOS policy included)."""
    tasks, s = res["tasks"], res["settings"]
    lines = ["| task | n | acc | acc_norm | reported | ppl |", "|---|---:|---:|---:|---:|---:|"]
    for name, t in tasks.items():
        ppl = t.get("perplexity")
        lines.append(f"| {name} | {t['n']} | {_pm(t, 'acc')} | {_pm(t, 'acc_norm')} | "
                     f"{_pct(t.get('score'))} ({t.get('metric')}) | {'-' if ppl is None else f'{ppl:.3f}'} |")
    if res.get("mean") is not None:
        n7 = sum(1 for k in tasks if k in ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag",
                                            "openbookqa"))
        lines.append(f"| **mean of {n7} zero-shot** | | | | **{_pct(res['mean'])}** | |")
    mmlu = tasks.get("mmlu")
    if mmlu:
        lines += ["", f"MMLU ({s['num_fewshot']}-shot), size-weighted as lm-eval's groups:", "",
                  "| category | n | acc |", "|---|---:|---:|"]
        lines += [f"| {c} | {v['n']} | {_pm(v, 'acc')} |" for c, v in mmlu["categories"].items()]
        lines += [f"| **mmlu** | {mmlu['n']} | **{_pm(mmlu, 'acc')}** |", "",
                  "<details><summary>MMLU per subject</summary>", "", "| subject | n | acc |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {_pct(v.get('acc'))} |" for k, v in sorted(mmlu["subjects"].items())]
        lines += ["", "</details>"]
    lim = s.get("limit")
    lines += ["", f"lm-eval-harness {s['lm_eval']}, {s['num_fewshot']}-shot, "
                  f"{'first ' + str(lim) + ' documents per task' if lim else 'full splits'} "
                  f"(local YAMLs: {', '.join(s['local']) or 'none'}; registry: {', '.join(s['registry']) or 'none'}); "
                  f"BOS policy: {s['bos']}; {s['seconds']:.0f} s."]
    return lines
