"""Zero-shot multiple-choice tasks: readers of the local files and lm-eval-harness 0.4 prompts.

Each reader turns one file under ``$SHORTLLM_DATA`` (formats: ``shared/data/SOURCES.md``) into
`MCItem`s carrying exactly the (context, continuation) pairs lm-eval-harness 0.4 scores; `harness_rows`
turns them into the rows lm-eval's own YAMLs read (`shortllm.evaluation.harness`, the scorer). Templates:

- boolq:  ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``no``/``yes`` (acc)
- piqa:   ``"Question: {goal}\\nAnswer:"``, choices ``sol1``/``sol2`` (acc)
- winogrande: partial scoring (``multiple_inputs``): the CONTEXT varies per option
  (sentence up to ``_`` with the option filled in), the continuation ``" " + rest.strip()`` is shared (acc)
- arc_easy / arc_challenge: ``"Question: {question}\\nAnswer:"`` (acc / acc_norm)
- hellaswag: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` (acc_norm)
- openbookqa: ``question_stem`` alone (acc_norm)

Every continuation is ``" " + choice`` (target delimiter one space). acc_norm divides a choice's
log-likelihood by ``len(choice)`` in characters (lm-eval's ``completion_len``; for winogrande lm-eval's
"choices" are the contexts, kept here for parity although winogrande reports acc).

Local-file caveats (documented, not fixable from the data we have):

- BoolQ's file stores ``"Passage: {passage}\\nQuestion: {question}?"``; the prefix is removed and
  ``"\\nAnswer:"`` appended, which rebuilds lm-eval's prompt exactly.
- HellaSwag is llama.cpp's 6-line format: ``ctx`` is ``ctx_a + " " + ctx_b`` with markers already
  stripped, so the split into ``ctx_a``/``ctx_b`` is lost. lm-eval capitalises ``ctx_b`` (the unfinished
  last sentence of ActivityNet items). We recover it heuristically: when the context does not end with
  sentence punctuation, the fragment after the last ``". "``/``"! "``/``"? "`` is taken as ``ctx_b`` and
  ``str.capitalize()``-d. WikiHow items (``ctx_b == ""``) end with punctuation and are left alone.
  lm-eval turns ``" [title]"`` into ``". "``; what the file's producer did there is unknown.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from shortllm.errors import DataError

__all__ = ["MCItem", "TaskSpec", "TASKS", "DEFAULT_TASKS", "load_task", "task_spec", "hellaswag_preprocess"]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as lm-eval scores it: request k = (contexts[k], continuations[k])."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]   # what acc_norm's character length is taken of
    gold: int

    def __post_init__(self):
        n = len(self.choices)
        if not (len(self.contexts) == len(self.continuations) == n) or not 0 <= self.gold < n:
            raise DataError(f"malformed item: {len(self.contexts)} contexts, {len(self.continuations)} "
                            f"continuations, {n} choices, gold={self.gold}")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    files: tuple[str, ...]          # relative to the data dir
    reader: Callable[..., list[MCItem]]
    metric: str                     # the metric the 7-task average uses: "acc" or "acc_norm"
    expected: int                   # item count of the full split (sanity check)
    split: str


def _shared(context: str, choices: list[str], gold: int) -> MCItem:
    """The common case: one context, continuation = target delimiter + choice."""
    return MCItem(contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices),
                  choices=tuple(choices), gold=int(gold))


def _read_lines(path: Path) -> list[str]:
    from shortllm.data.corpora import (
        read_utf8,  # one reader (gzip, missing/corrupt/non-UTF-8 errors) for every data file
    )

    return read_utf8(path).splitlines()


def _jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for i, ln in enumerate(_read_lines(path)):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError as e:
            raise DataError(f"{path} line {i + 1} is not JSON ({e}).") from None
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(f"{path} line {i + 1} lacks key(s) {missing}; expected the format in SOURCES.md.")
        rows.append(row)
    return rows


def _boolq(paths: list[Path]) -> list[MCItem]:
    items = []
    for r in _jsonl(paths[0], ("query", "choices", "gold")):
        q = r["query"]
        if not q.startswith("Passage: "):
            raise DataError(f"{paths[0]}: BoolQ query does not start with 'Passage: ' ({q[:40]!r}...)")
        items.append(_shared(q[len("Passage: "):] + "\nAnswer:", ["no", "yes"], r["gold"]))
    return items


def _piqa(paths: list[Path]) -> list[MCItem]:
    rows = _jsonl(paths[0], ("goal", "sol1", "sol2"))
    labels = [ln.strip() for ln in _read_lines(paths[1]) if ln.strip()]
    if len(labels) != len(rows):
        raise DataError(f"PIQA: {len(rows)} questions but {len(labels)} labels; the two files must align.")
    return [_shared(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(lab))
            for r, lab in zip(rows, labels)]


def _winogrande(paths: list[Path]) -> list[MCItem]:
    items = []
    for r in _jsonl(paths[0], ("context_options", "continuation", "gold")):
        ctxs = tuple(r["context_options"])
        cont = " " + r["continuation"].strip()
        items.append(MCItem(contexts=ctxs, continuations=(cont,) * len(ctxs), choices=ctxs, gold=int(r["gold"])))
    return items


def _arc(paths: list[Path]) -> list[MCItem]:
    items = []
    for r in _jsonl(paths[0], ("query", "choices", "gold")):
        q = r["query"]
        if not q.startswith("Question: "):
            q = "Question: " + q
        items.append(_shared(q + "\nAnswer:", list(r["choices"]), r["gold"]))
    return items


def _obqa(paths: list[Path]) -> list[MCItem]:
    return [_shared(r["query"], list(r["choices"]), r["gold"])
            for r in _jsonl(paths[0], ("query", "choices", "gold"))]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py::preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_SENT_END = re.compile(r"[.!?]\"? ")


def _hellaswag_query(line: str) -> str:
    label, sep, ctx = line.partition(": ")
    if not sep:
        label, ctx = "", line
    ctx = ctx.strip()
    if ctx and ctx[-1] not in ".!?\"'":
        cuts = list(_SENT_END.finditer(ctx))
        if cuts:
            k = cuts[-1].end()
            ctx = ctx[:k] + ctx[k:].capitalize()
    return hellaswag_preprocess((label + ": " if sep else "") + ctx)


def _hellaswag(paths: list[Path]) -> list[MCItem]:
    lines = _read_lines(paths[0])
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{paths[0]}: {len(lines)} lines is not a multiple of 6 (llama.cpp HellaSwag format).")
    items = []
    for i in range(0, len(lines), 6):
        try:
            gold = int(lines[i + 1].strip())
        except ValueError:
            raise DataError(f"{paths[0]} line {i + 2}: gold label {lines[i + 1]!r} is not 0-3.") from None
        items.append(_shared(_hellaswag_query(lines[i]), [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]], gold))
    return items


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("boolq", ("boolq/boolq.jsonl.gz",), _boolq, "acc", 3270, "validation"),
    TaskSpec("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, "acc", 1838, "validation"),
    TaskSpec("winogrande", ("winogrande/winogrande.jsonl",), _winogrande, "acc", 1267, "validation (xl dev)"),
    TaskSpec("arc_easy", ("arc/arc_easy.jsonl",), _arc, "acc", 2376, "test"),
    TaskSpec("arc_challenge", ("arc/arc_challenge.jsonl",), _arc, "acc_norm", 1172, "test"),
    TaskSpec("hellaswag", ("hellaswag/hellaswag_val_full.txt.gz",), _hellaswag, "acc_norm", 10042, "validation"),
    TaskSpec("openbookqa", ("openbookqa/openbook_qa.jsonl",), _obqa, "acc_norm", 500, "test"),
)}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)
_ALIASES = {"arc_e": "arc_easy", "arc-e": "arc_easy", "arce": "arc_easy", "arc_c": "arc_challenge",
            "arc-c": "arc_challenge", "arcc": "arc_challenge", "obqa": "openbookqa", "hs": "hellaswag",
            "wg": "winogrande", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge"}


def task_spec(name: str) -> TaskSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise DataError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[key]


def load_task(name: str, data_dir: Optional[str | os.PathLike] = None, limit: Optional[int] = None) -> list[MCItem]:
    """The items of a task from ``data_dir`` (default ``$SHORTLLM_DATA``), in file order.

    ``limit`` keeps the first N items (file order, no shuffling), as lm-eval's ``--limit`` does.
    """
    spec = task_spec(name)
    root = data_dir if data_dir is not None else os.environ.get("SHORTLLM_DATA")
    if not root:
        raise DataError(f"No data directory for task {spec.name!r}: set SHORTLLM_DATA to the shared data "
                        "folder (e.g. export SHORTLLM_DATA=../shared/data) or pass data_dir=.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data directory {str(root)!r} does not exist; point SHORTLLM_DATA at the shared data folder.")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive item count, got {limit}.")
    paths = [root / f for f in spec.files]
    items = _parsed(spec.name, tuple(paths), tuple(_identity(p) for p in paths))
    if not items:
        raise DataError(f"Task {spec.name!r}: {paths[0]} holds no items.")
    return list(items[:limit] if limit is not None else items)


def _identity(path: Path) -> tuple:
    """What says a file is unchanged (a rewritten file gets a new mtime or size, so the cache misses)."""
    try:
        st = path.stat()
    except OSError:
        return ()  # the reader raises the typed missing-file error
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _parsed(name: str, paths: tuple[Path, ...], identity: tuple) -> tuple[MCItem, ...]:
    # Parsed once per process: the experiment and CLI evaluate many models on the same files, and
    # HellaSwag's 10k items take seconds to parse. Items are frozen, so sharing them is safe.
    return tuple(TASKS[name].reader(list(paths)))


# ---------------------------------------------------------------- rows in the Hugging Face schemas
# lm-eval's task YAMLs address the HF datasets' fields (ARC's choices.text/label, PIQA's goal/sol1/sol2,
# ...). These readers turn each local file into rows of that schema, so the YAMLs `shortllm.evaluation.
# harness` writes can keep lm-eval's own doc_to_text/doc_to_choice/doc_to_target templates verbatim.
# Where the local file has lost a field (BoolQ's title, ARC's question ids, HellaSwag's ctx_a/ctx_b split)
# the row carries what the template needs, rebuilt as the module docstring explains.

HARNESS_TASKS: tuple[str, ...] = DEFAULT_TASKS + ("lambada_openai", "mmlu")

# lm-eval's mmlu grouping (the `tag: mmlu_<category>_tasks` of each lm_eval/tasks/mmlu/default YAML; a
# test checks this table against the installed lm-eval).
MMLU_CATEGORIES: dict[str, str] = {
    **dict.fromkeys((
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning").split(), "stem"),
    **dict.fromkeys((
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions").split(), "humanities"),
    **dict.fromkeys((
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy").split(), "social_sciences"),
    **dict.fromkeys((
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
        "virology").split(), "other"),
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(MMLU_CATEGORIES))


def data_root(data_dir: Optional[str | os.PathLike] = None) -> Path:
    """``data_dir`` or ``$SHORTLLM_DATA``, checked to exist."""
    root = data_dir if data_dir is not None else os.environ.get("SHORTLLM_DATA")
    if not root:
        raise DataError("No data directory: set SHORTLLM_DATA to the shared data folder "
                        "(e.g. export SHORTLLM_DATA=../shared/data) or pass data_dir=.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data directory {str(root)!r} does not exist; point SHORTLLM_DATA at the shared data folder.")
    return root


def _labelled(choices: Sequence[str]) -> dict:
    return {"text": list(choices), "label": [chr(ord("A") + i) for i in range(len(choices))]}


def _mc_rows(name: str, data_dir) -> list[dict]:
    """The 7 zero-shot tasks, from the parsed items (one parser per file format) back into the fields
    lm-eval's YAMLs read."""
    items = load_task(name, data_dir)
    rows = []
    for it in items:
        ch = list(it.choices)
        if name == "boolq":
            passage, sep, question = it.contexts[0][: -len("\nAnswer:")].rpartition("\nQuestion: ")
            if not sep or not question.endswith("?"):
                raise DataError(f"BoolQ item {len(rows)}: cannot split passage and question ({question[:40]!r}).")
            rows.append({"passage": passage, "question": question[:-1], "label": it.gold})
        elif name == "piqa":
            rows.append({"goal": it.contexts[0][len("Question: "):-len("\nAnswer:")], "sol1": ch[0], "sol2": ch[1],
                         "label": it.gold})
        elif name == "winogrande":
            # lm-eval's partial scoring: the contexts are the choices, the shared target follows " "
            rows.append({"context_options": list(it.contexts), "target": it.continuations[0][1:], "gold": it.gold})
        elif name in ("arc_easy", "arc_challenge"):
            rows.append({"question": it.contexts[0][len("Question: "):-len("\nAnswer:")], "choices": _labelled(ch),
                         "answerKey": chr(ord("A") + it.gold)})
        elif name == "openbookqa":
            rows.append({"question_stem": it.contexts[0], "choices": _labelled(ch),
                         "answerKey": chr(ord("A") + it.gold)})
        elif name == "hellaswag":
            rows.append({"query": it.contexts[0], "choices": ch, "label": str(it.gold)})
        else:  # pragma: no cover - HARNESS_TASKS and this function are kept in step
            raise DataError(f"no row reader for {name!r}")
    return rows


def _lambada_rows(root: Path) -> list[dict]:
    # lm-eval's lambada_openai splits `text` at its last " ": the local file stores the two halves
    rows = _jsonl(root / "lambada" / "lambada_openai.jsonl", ("context", "continuation"))
    return [{"text": r["context"] + " " + r["continuation"]} for r in rows]


def _mmlu_csv(path: Path, subject: str) -> list[dict]:
    import csv

    if not path.is_file():
        raise DataError(f"MMLU file {str(path)!r} is missing; SHORTLLM_DATA must hold mmlu/test and mmlu/dev "
                        "(shared/data/SOURCES.md).")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, rec in enumerate(csv.reader(f)):
            if len(rec) != 6 or rec[5] not in ("A", "B", "C", "D"):
                raise DataError(f"{path} record {i + 1}: expected question,A,B,C,D,answer-letter; got {len(rec)} "
                                f"fields ending {rec[-1:]!r}.")
            rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5], "answer": "ABCD".index(rec[5])})
    return rows


def mmlu_rows(subject: str, split: str, data_dir=None) -> list[dict]:
    """One MMLU subject's ``test`` or ``dev`` CSV as rows of the HF ``cais/mmlu`` schema
    (question, subject, choices, answer index)."""
    if subject not in MMLU_CATEGORIES:
        raise DataError(f"Unknown MMLU subject {subject!r}; valid: {', '.join(MMLU_SUBJECTS)}.")
    if split not in ("test", "dev"):
        raise DataError(f"MMLU split must be 'test' or 'dev', got {split!r}.")
    return _mmlu_csv(data_root(data_dir) / "mmlu" / split / f"{subject}_{split}.csv", subject)


def harness_rows(name: str, data_dir=None) -> list[dict]:
    """A non-MMLU task's local file as rows of the HF dataset lm-eval's YAML reads (file order)."""
    if name == "lambada_openai":
        return _lambada_rows(data_root(data_dir))
    return _mc_rows(task_spec(name).name, data_dir)
