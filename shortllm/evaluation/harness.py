"""Benchmarks through lm-eval-harness (the optional extra ``shortllm[eval]``, lm-eval 0.4.13).

The model in memory (pruned, exported or fresh) is wrapped in lm-eval's own Hugging Face class
(``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)``) and scored by
``lm_eval.simple_evaluate`` in this process.

Offline, the tasks come from the files under ``$SHORTLLM_DATA`` (``shared/data/SOURCES.md``): for each
requested task `write_local_tasks` writes the rows (HF schema, `shortllm.data.tasks.harness_rows`) as
JSONL and a task YAML with ``dataset_path: json`` into a temporary directory, and lm-eval reads them
through ``TaskManager(include_path=..., include_defaults=False)``. The YAMLs carry lm-eval's own
prompts (doc_to_text / doc_to_choice / doc_to_target of ``lm_eval/tasks/{arc,piqa,...}``) verbatim;
the exceptions, forced by what the local files keep:

- winogrande: lm-eval's ``preprocess_winogrande`` functions become the row fields they compute
  (``context_options`` = doc_to_choice, ``target`` = doc_to_target, ``gold`` = doc_to_text);
- hellaswag: the rows hold what lm-eval's ``process_docs`` produces (``query``, ``choices``), rebuilt
  from the llama.cpp-format file (see `shortllm.data.tasks` on the ``ctx_b`` capitalisation);
- mmlu: one YAML per subject as ``lm_eval/tasks/mmlu/default`` (the subject description, the lettered
  prompt, ``first_n`` few-shot from ``dev``), grouped into stem / humanities / social_sciences / other
  and ``mmlu`` with size-weighted averages, as lm-eval does.

A task name that is not local (or every task, with ``source="registry"``) goes to lm-eval's registry,
which downloads its dataset: that needs the network.

BOS: lm-eval encodes with the tokenizer's default special tokens (``add_bos_token=None``), i.e. with BOS
exactly when the tokenizer adds it (Gemma yes, SmolLM2 no). That is the policy the perplexity
evaluator's ``bos="auto"`` applies too; every result records it (``settings.bos``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from shortllm.errors import DataError

LOCAL_TASKS = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa",
               "lambada_openai", "mmlu")
SEVEN = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa")
# the metric each zero-shot task reports in the 7-task average (SPEC §3)
REPORTED = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm",
            "hellaswag": "acc_norm", "openbookqa": "acc_norm", "lambada_openai": "acc", "mmlu": "acc"}
MMLU_GROUPS = ("stem", "humanities", "social_sciences", "other")

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_MC = {"output_type": "multiple_choice", "test_split": "test"}
# lm-eval's templates (lm_eval/tasks/*/*.yaml, 0.4.13), field for field
_TEMPLATES = {
    "boolq": {**_MC, "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
              "doc_to_choice": ["no", "yes"], "metric_list": [_ACC], "metadata": {"version": 2.0}},
    "piqa": {**_MC, "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
             "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}},
    "winogrande": {**_MC, "doc_to_text": "gold", "doc_to_target": "target", "doc_to_choice": "context_options",
                   "metric_list": [_ACC], "metadata": {"version": 1.0}},
    "arc_easy": {**_MC, "doc_to_text": "Question: {{question}}\nAnswer:",
                 "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
                 "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}},
    "hellaswag": {**_MC, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
                  "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}},
    "openbookqa": {**_MC, "doc_to_text": "question_stem",
                   "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                   "doc_to_choice": "{{choices.text}}", "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}},
    "lambada_openai": {"output_type": "loglikelihood", "test_split": "test",
                       "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                       "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                       "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                       _ACC], "metadata": {"version": 1.0}},
}
_TEMPLATES["arc_challenge"] = _TEMPLATES["arc_easy"]
_MMLU = {"output_type": "multiple_choice", "test_split": "test", "fewshot_split": "dev",
         "fewshot_config": {"sampler": "first_n"},
         "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. "
                        "{{choices[3]}}\nAnswer:",
         "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer", "metric_list": [_ACC],
         "metadata": {"version": 1.0}}
_GROUP_AGG = [{"metric": "acc", "weight_by_size": True}]


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DataError("lm-eval-harness is not installed; install the extra: pip install 'shortllm[eval]' "
                        "(lm-eval==0.4.13).") from None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_yaml(path: Path, cfg: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")


def _json_source(files: dict[str, Path], cache: Path) -> dict:
    # datasets' Arrow cache goes beside the rows (a temp dir), not into the user's HF cache
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()},
                                                       "cache_dir": str(cache)}}


def _mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def write_local_tasks(tasks: Sequence[str], out_dir: str | os.PathLike, data_dir=None,
                      limit: Optional[int] = None) -> list[str]:
    """Write lm-eval task YAMLs (and their JSONL rows) for ``tasks`` from the local data into ``out_dir``.

    ``limit`` writes only the first N test rows of each task (MMLU: of each subject; its dev split
    whole): what lm-eval's ``limit`` would evaluate anyway, without loading the rest through ``datasets``.

    Returns the names to hand to lm-eval (the task names themselves; ``mmlu`` is a group of 57 subject
    tasks ``mmlu_<subject>`` under the groups ``mmlu_stem``, ``mmlu_humanities``, ``mmlu_social_sciences``,
    ``mmlu_other``)."""
    from shortllm.data.tasks import MMLU_CATEGORIES, harness_rows, mmlu_rows

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "hf_datasets_cache"
    names = []
    for name in tasks:
        if name not in LOCAL_TASKS:
            raise DataError(f"No local data for task {name!r}; local tasks: {', '.join(LOCAL_TASKS)}.")
        if name == "mmlu":
            for subject, cat in MMLU_CATEGORIES.items():
                files = {}
                for split in ("test", "dev"):
                    files[split] = out / f"mmlu_{subject}_{split}.jsonl"
                    rows = mmlu_rows(subject, split, data_dir)
                    _write_jsonl(files[split], rows[:limit] if split == "test" and limit else rows)
                _write_yaml(out / f"mmlu_{subject}.yaml",
                            {"task": f"mmlu_{subject}", "task_alias": subject, "tag": f"mmlu_{cat}_tasks",
                             **_json_source(files, cache), "description": _mmlu_description(subject), **_MMLU})
            for cat in sorted(set(MMLU_CATEGORIES.values())):
                _write_yaml(out / f"_mmlu_{cat}.yaml",
                            {"group": f"mmlu_{cat}", "group_alias": cat, "task": [f"mmlu_{cat}_tasks"],
                             "aggregate_metric_list": _GROUP_AGG, "metadata": {"version": 2}})
            _write_yaml(out / "_mmlu.yaml", {"group": "mmlu", "task": [f"mmlu_{c}" for c in MMLU_GROUPS],
                                             "aggregate_metric_list": _GROUP_AGG, "metadata": {"version": 2}})
        else:
            path = out / f"{name}.jsonl"
            rows = harness_rows(name, data_dir)
            _write_jsonl(path, rows[:limit] if limit else rows)
            _write_yaml(out / f"{name}.yaml", {"task": name, **_json_source({"test": path}, cache), **_TEMPLATES[name]})
        names.append(name)
    return names


@dataclass
class HarnessResult:
    """lm-eval results, flattened: per task its metrics (``acc``, ``acc_stderr``, ``acc_norm``, ...,
    ``n``, ``metric``/``score`` = the reported one); ``mmlu`` adds ``categories`` and ``subjects``."""

    tasks: dict
    mean: Optional[float]            # average of the reported metric over the 7 zero-shot tasks present
    settings: dict = field(default_factory=dict)
    samples: Optional[dict] = None   # lm-eval's per-item records (log_samples=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


def _metrics(res: dict, n: int) -> dict:
    out = {}
    for k, v in res.items():
        if "," not in k:
            continue
        metric, _filter = k.split(",", 1)
        out[metric] = None if isinstance(v, str) else float(v)  # lm-eval writes "N/A" for missing stderrs
    for m in ("acc", "acc_norm"):
        # lm-eval's closed-form mean_stderr of a 0/1 metric (its bootstrap pool is skipped: bootstrap_iters=0)
        if out.get(m) is not None and out.get(f"{m}_stderr") is None and n > 1:
            out[f"{m}_stderr"] = math.sqrt(out[m] * (1 - out[m]) / (n - 1))
    return out


def _flatten(raw: dict) -> dict:
    """simple_evaluate's output -> {task: {...}} with MMLU's subjects and categories nested."""
    results, n_samples = raw["results"], raw.get("n-samples", {})
    tasks = {}
    for name, res in results.items():
        if name.startswith("mmlu"):
            continue
        n = int(n_samples.get(name, {}).get("effective", 0))
        m = _metrics(res, n)
        rep = REPORTED.get(name, "acc" if "acc" in m else next(iter(m), None))
        tasks[name] = {**m, "n": n, "metric": rep, "score": m.get(rep)}
    if "mmlu" in results:
        sizes = {k[len("mmlu_"):]: int(v.get("effective", 0)) for k, v in n_samples.items() if k.startswith("mmlu_")}
        subjects = {}
        for k, v in results.items():
            sub = k[len("mmlu_"):]
            if k.startswith("mmlu_") and sub not in MMLU_GROUPS:
                subjects[sub] = {**_metrics(v, sizes.get(sub, 0)), "n": sizes.get(sub, 0)}
        cats = {}
        for c in MMLU_GROUPS:
            if f"mmlu_{c}" in results:
                n = sum(s["n"] for k, s in subjects.items() if _category(k) == c)
                cats[c] = {**_metrics(results[f"mmlu_{c}"], n), "n": n}
        n = sum(s["n"] for s in subjects.values())
        m = _metrics(results["mmlu"], n)
        tasks["mmlu"] = {**m, "n": n, "metric": "acc", "score": m.get("acc"), "categories": cats, "subjects": subjects}
    return tasks


def _category(subject: str) -> str:
    from shortllm.data.tasks import MMLU_CATEGORIES

    return MMLU_CATEGORIES.get(subject, "?")


def harness_eval(model: nn.Module, tokenizer, tasks: Sequence[str], *, num_fewshot: int = 0,
                 limit: Optional[int] = None, batch_size: int = 8, data_dir=None, source: str = "auto",
                 log_samples: bool = False) -> HarnessResult:
    """Evaluate ``model`` with lm-eval-harness on ``tasks`` (see the module docstring).

    ``source``: ``auto`` (local YAMLs for the tasks in `LOCAL_TASKS` when ``$SHORTLLM_DATA``/``data_dir``
    is set, the registry otherwise), ``local`` or ``registry``. ``limit``: the first N documents of each
    task (MMLU: of each subject), as lm-eval's ``--limit``. ``num_fewshot`` > 0 is for MMLU (the dev
    split's first N, lm-eval's ``first_n``) or registry tasks; the other local tasks have no few-shot
    split here, so it is an error for them. lm-eval draws its own progress bars (it has no switch for them)."""
    require_lm_eval()
    from shortllm.evaluation.corpus_ppl import tokenizer_adds_bos

    tasks = list(dict.fromkeys(t.strip().lower() for t in tasks if t.strip()))
    if not tasks:
        raise DataError("No tasks given; pass lm-eval task names, e.g. " + ",".join(LOCAL_TASKS) + ".")
    if source not in ("auto", "local", "registry"):
        raise DataError(f"Unknown task source {source!r}; valid: auto, local, registry.")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive item count, got {limit}.")
    if num_fewshot < 0:
        raise DataError(f"num_fewshot must be >= 0, got {num_fewshot}.")
    has_data = data_dir is not None or bool(os.environ.get("SHORTLLM_DATA"))
    local = [t for t in tasks if source != "registry" and t in LOCAL_TASKS and (has_data or source == "local")]
    remote = [t for t in tasks if t not in local]
    if source == "local" and remote:
        raise DataError(f"No local data for {remote}; local tasks: {', '.join(LOCAL_TASKS)} (or use the registry).")
    if num_fewshot and [t for t in local if t != "mmlu"]:
        raise DataError(f"num_fewshot={num_fewshot} does not apply to the local {[t for t in local if t != 'mmlu']}: "
                        "their files have no few-shot split. Use --num-fewshot 0, or evaluate them separately.")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    flat, samples, t0 = {}, {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shortllm-lmeval-") as tmp:
        runs = []
        if local:
            names = write_local_tasks(local, tmp, data_dir, limit)
            runs.append((names, TaskManager(include_path=tmp, include_defaults=False)))
        if remote:
            registry = TaskManager()
            unknown = [t for t in remote if t not in registry.all_tasks]
            if unknown:
                raise DataError(f"Unknown task(s) {unknown}: neither local ({', '.join(LOCAL_TASKS)}) nor in "
                                f"lm-eval {_lm_eval_version()}'s registry (`lm-eval ls tasks` lists it).")
            runs.append((remote, registry))
        for names, tm in runs:
            raw = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  log_samples=log_samples, bootstrap_iters=0, verbosity="ERROR")
            if raw is None:  # only a non-zero rank of a distributed run gets None
                continue
            flat.update(_flatten(raw))
            samples.update(raw.get("samples") or {})
    seven = [flat[t]["score"] for t in SEVEN if t in flat and flat[t].get("score") is not None]
    settings = {"engine": "lm-eval-harness", "lm_eval": _lm_eval_version(), "num_fewshot": num_fewshot,
                "limit": limit, "batch_size": batch_size, "local": local, "registry": remote,
                "bos": "tokenizer default: BOS " + ("added" if tokenizer_adds_bos(tokenizer) else "not added"),
                "seconds": round(time.perf_counter() - t0, 2)}
    return HarnessResult(tasks=flat, mean=sum(seven) / len(seven) if seven else None, settings=settings,
                         samples=samples if log_samples else None)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")

