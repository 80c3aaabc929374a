"""Named evaluation/calibration corpora under ``$SHORTLLM_DATA`` (or the Hugging Face hub).

Formats in ``shared/data/SOURCES.md``:

- ``wikitext2`` (raw, splits ``test``/``validation``): rows follow Hugging Face ``Salesforce/wikitext``
  semantics (one row per line, whitespace-only lines become ``""``, other lines keep their trailing
  ``\\n``); the evaluation string is ``"\\n\\n".join(rows)`` as in GPTQ/SparseGPT/Wanda/LLM-Pruner.
- ``ptb`` (splits ``test``/``validation``/``train``): rows are the stripped sentence lines (HF
  ``ptb_text_only`` ``sentence``). The evaluation string is ``"\\n\\n".join(rows)``: LLM-Pruner's
  ``PPL`` code (and Shortened LLaMA, which reuses it) tokenises ``"\\n\\n".join(samples["sentence"])``
  for PTB as for WikiText-2, so numbers compare with those papers (GPTQ uses ``" ".join``; pass
  ``join=" "`` for that protocol).
- ``c4`` (split ``validation``, the 2,000-document sample): rows are the documents' ``text``; joined
  with ``"\\n\\n"``.

Without ``$SHORTLLM_DATA``, if the ``datasets`` package is importable, the same corpora come from the
Hugging Face hub (``c4``: the first 2,000 documents of validation shard 0, not the local sample).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

from shortllm.errors import DataError

# name -> split -> file relative to the data dir. Split aliases are resolved by _canon_split.
CORPORA: dict[str, dict[str, str]] = {
    "wikitext2": {"test": "wikitext-2/wiki.test.raw", "validation": "wikitext-2/wiki.valid.raw"},
    "ptb": {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt", "train": "ptb/ptb.train.txt.gz"},
    "c4": {"validation": "c4/c4-validation-sample-2k.jsonl.gz"},
}
_NAME_ALIASES = {"wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2",
                 "wiki": "wikitext2", "ptb": "ptb", "penn_treebank": "ptb", "c4": "c4"}
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "sample": "validation"}
# Hub fallbacks (used only when SHORTLLM_DATA is unset and `datasets` is importable).
_HUB = {
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence"),
    "c4": (("allenai/c4",), "text"),
}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data folder: ``path`` if given, else ``$SHORTLLM_DATA``; raises `DataError` when neither is set."""
    p = path if path is not None else os.environ.get("SHORTLLM_DATA")
    if not p:
        raise DataError(
            "No data directory: set SHORTLLM_DATA to the folder holding wikitext-2/, ptb/ and c4/ "
            "(e.g. export SHORTLLM_DATA=../shared/data), or install `datasets` and be online to use the hub.")
    d = Path(p).expanduser()
    if not d.is_dir():
        raise DataError(f"SHORTLLM_DATA={str(d)!r} is not a directory; point it at the folder holding "
                        "wikitext-2/, ptb/ and c4/.")
    return d


def canonical_corpus(name: str) -> str:
    """The canonical corpus name for ``name`` (``"WikiText-2"`` -> ``"wikitext2"``); `DataError` if unknown."""
    key = _NAME_ALIASES.get(str(name).lower().replace("_", "").replace(" ", "")) or _NAME_ALIASES.get(str(name).lower())
    if key is None:
        raise DataError(f"Unknown corpus {name!r}; valid names: {', '.join(sorted(CORPORA))}.")
    return key


def _canon_split(name: str, split: str) -> str:
    s = _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    if name == "c4" and s == "test":  # the only C4 text here is the validation sample
        s = "validation"
    if s not in CORPORA[name]:
        raise DataError(f"Corpus {name!r} has no split {split!r}; valid splits: {', '.join(CORPORA[name])}."
                        + (" (WikiText-2 train is not available locally; use validation, ptb train or c4.)"
                           if name == "wikitext2" and s == "train" else ""))
    return s


def read_utf8(path: Path) -> str:
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Missing data file {path}; SHORTLLM_DATA must point at the shared data folder "
                        "(see SOURCES.md for the expected layout).") from None
    except (OSError, EOFError) as e:
        raise DataError(f"Cannot read {path}: {e}; the file is corrupt or truncated, restore it.") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8).") from None


def _rows_from_file(name: str, path: Path) -> list[str]:
    text = read_utf8(path)
    if name == "wikitext2":
        return [ln if ln.strip() else "" for ln in text.splitlines(keepends=True)]
    if name == "ptb":
        return [ln.strip() for ln in text.splitlines()]
    rows = []
    for i, ln in enumerate(text.splitlines()):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln)["text"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} line {i + 1} is not a JSON object with a 'text' key ({e}).") from None
    return rows


def _rows_from_hub(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        data_dir()  # raises the DataError telling how to set SHORTLLM_DATA
    (args, field) = _HUB[name]
    kwargs = {}
    if name == "c4":
        kwargs = {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}
    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as e:  # offline, hub moved, auth: all mean "no data"
        raise DataError(f"Could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                        "set SHORTLLM_DATA to the local data folder instead.") from e
    rows = list(ds[field])
    return rows[:2000] if name == "c4" else rows


@functools.lru_cache(maxsize=16)
def _cached_rows(name: str, split: str, root: str | None) -> tuple[str, ...]:
    if root is None:
        return tuple(_rows_from_hub(name, split))
    return tuple(_rows_from_file(name, Path(root) / CORPORA[name][split]))


def _resolve_root(dir_: str | os.PathLike | None) -> str | None:
    if dir_ is None and not os.environ.get("SHORTLLM_DATA"):
        try:
            import datasets  # noqa: F401
            return None
        except ImportError:
            pass
    return str(data_dir(dir_).resolve())


def corpus_rows(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[str]:
    """The rows of a named corpus split (see the module docstring for the row semantics)."""
    n = canonical_corpus(name)
    s = _canon_split(n, split)
    return list(_cached_rows(n, s, _resolve_root(data_dir)))


@functools.lru_cache(maxsize=16)
def _cached_text(name: str, split: str, root: str | None, join: str) -> str:
    return join.join(_cached_rows(name, split, root))


def load_corpus_text(name: str, split: str = "test", data_dir: str | os.PathLike | None = None,
                     *, join: str = "\n\n") -> str:
    """One evaluation string for a named corpus split: its rows joined with ``join`` (default ``"\\n\\n"``).

    ``c4`` has only ``validation`` (the 2k-document sample); its ``test`` split maps to it.
    Unknown names/splits and missing files raise `DataError`. Parsed text is cached per process.
    """
    n = canonical_corpus(name)
    s = _canon_split(n, split)
    return _cached_text(n, s, _resolve_root(data_dir), join)
