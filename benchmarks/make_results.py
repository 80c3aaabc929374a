"""Assemble benchmarks/RESULTS.md from the per-topic files each benchmark script writes in results/.

    python benchmarks/make_results.py
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["score", "cosine_span", "ops", "ppl", "speed", "eval", "reproduce", "reproduce_full", "retrain", "distributed",
         "offload_smollm", "offload", "coverage", "gpu_cpu_mode", "gpu", "heal"]
ORDER += ["recovery_smollm2-135m", "recovery_gemma3-270m"]
ORDER += ["criteria_smollm2-135m", "criteria_gemma3-270m"]
ORDER += ["eval_lmeval", "eval_published"]
ORDER += ["gguf_quant"]


def main() -> None:
    parts = {p.stem: p.read_text().strip() for p in sorted((HERE / "results").glob("*.md"))}
    for png in (HERE / "results").glob("*.png"):  # images are linked relative to results/
        parts = {k: v.replace(f"]({png.name})", f"](results/{png.name})") for k, v in parts.items()}
    names = [n for n in ORDER if n in parts] + sorted(set(parts) - set(ORDER))
    text = ["# Benchmark results", "",
            "Every section says when, on what machine, with which versions and at which commit it was measured, "
            "and the script that regenerates it. This machine has 2 CPU cores and no GPU: all timings are CPU "
            "timings, compared as ratios measured in one run; no GPU speed is claimed.", ""]
    text += ["Sections: " + ", ".join(f"[{n}](#{n})" for n in names), ""]
    for n in names:
        text += [f'<a id="{n}"></a>', "", parts[n], ""]
        for png in sorted((HERE / "results").glob(f"{n}*.png")):
            if f"results/{png.name}" not in parts[n]:
                text += [f"![{png.stem}](results/{png.name})", ""]
    (HERE / "RESULTS.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
