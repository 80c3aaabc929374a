"""Calibration and evaluation text: named corpora under ``$SHORTLLM_DATA`` and calibration loaders.

Named corpora (formats in ``shared/data/SOURCES.md``):

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
The calibration loader (`calibration_loader`) turns any text source into fixed, seeded batches.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .errors import DataError, EmptyLoaderError

__all__ = ["data_dir", "canonical_corpus", "corpus_rows", "load_corpus_text", "CORPORA", "CalibrationData", "calibration_loader",
           "tokenize_text", "DEFAULT_CALIB_SPLIT"]

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


def _read_utf8(path: Path) -> str:
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
    text = _read_utf8(path)
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


# ---------------------------------------------------------------------------------------------- loader
# Calibration never uses an evaluation split by default: WikiText-2 train is absent locally (SOURCES.md),
# so calibration reads its validation split (the test split is the PPL benchmark); PTB has a train split.
DEFAULT_CALIB_SPLIT = {"wikitext2": "validation", "ptb": "train", "c4": "validation"}
_TOK_CACHE: OrderedDict = OrderedDict()
_TOK_CACHE_SIZE = 4


class CalibrationData:
    """A fixed list of batches ``{"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]}``.

    Iterable (re-iterable: the batches are materialised), with ``len()`` = number of batches,
    ``n_tokens`` = valid (mask 1) tokens, a JSON-able ``description`` and a content ``fingerprint``.
    """

    def __init__(self, batches: Sequence[dict], description: dict | None = None):
        self.batches: list[dict[str, torch.Tensor]] = list(batches)
        self.description: dict = dict(description or {})

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        return (f"CalibrationData({len(self)} batches, {self.n_samples} samples, {self.n_tokens} tokens, "
                f"source={self.description.get('source')!r})")

    @property
    def n_tokens(self) -> int:
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    @property
    def n_samples(self) -> int:
        return int(sum(b["input_ids"].shape[0] for b in self.batches))

    @property
    def fingerprint(self) -> str:
        """sha256 of every batch's shape, ids and mask (as little-endian int64); same data, same hash."""
        h = hashlib.sha256()
        for b in self.batches:
            for key in ("input_ids", "attention_mask"):
                t = b[key].detach().to("cpu", torch.int64).contiguous()
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().astype("<i8", copy=False).tobytes())
        return h.hexdigest()

    def shard(self, rank: int, world: int) -> "CalibrationData":
        """Batches ``rank, rank + world, ...``: the shards of ``world`` ranks are disjoint and cover all."""
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"shard(rank={rank}, world={world}) needs world >= 1 and 0 <= rank < world.")
        if len(self.batches) < world:
            raise EmptyLoaderError(f"{len(self.batches)} batches cannot feed {world} ranks (rank {rank} would get "
                                   "none); lower batch_size or raise n_samples.")
        return CalibrationData(self.batches[rank::world], {**self.description, "shard": [rank, world]})

    def to(self, device: str | torch.device) -> "CalibrationData":
        moved = [{k: v.to(device) for k, v in b.items()} for b in self.batches]
        return CalibrationData(moved, self.description)


def _tok_name(tokenizer) -> str:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    try:  # the built-in model's cache dir is machine-specific; its marker holds the portable name
        marker = Path(name) / "shortllm_builtin.json"
        if marker.is_file():
            return str(json.loads(marker.read_text()).get("name", name))
    except (OSError, ValueError):
        pass
    return name


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text, add_special_tokens=False)`` as a 1-D LongTensor; the last few results are cached
    (keyed by tokenizer name, vocab size and the text's sha1) so corpora are tokenised once per process."""
    if tokenizer is None:
        raise DataError("Text data needs a tokenizer: pass tokenizer= (e.g. the one load_model returns).")
    key = (type(tokenizer).__name__, _tok_name(tokenizer), len(tokenizer),
           hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest())
    hit = _TOK_CACHE.get(key)
    if hit is not None:
        _TOK_CACHE.move_to_end(key)
        return hit
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    _TOK_CACHE[key] = out
    while len(_TOK_CACHE) > _TOK_CACHE_SIZE:
        _TOK_CACHE.popitem(last=False)
    return out


def _pad_id(tokenizer, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    return 0


def _batch(ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": ids[i:i + batch_size].contiguous(), "attention_mask": mask[i:i + batch_size].contiguous()}
            for i in range(0, ids.shape[0], batch_size)]


def _looks_like_corpus(s: str) -> bool:
    try:
        canonical_corpus(s)
        return True
    except DataError:
        return False


def _is_path_item(s) -> bool:
    """A list item names a file if it is a Path, or a one-line str naming an existing file."""
    if isinstance(s, os.PathLike):
        return True
    return isinstance(s, str) and 0 < len(s) < 4096 and "\n" not in s and Path(s).expanduser().is_file()


def _read_text_files(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        if not p.is_file():
            raise DataError(f"Calibration text file {p} does not exist; pass an existing UTF-8 text file "
                            f"or a corpus name ({', '.join(CORPORA)}).")
        parts.append(_read_utf8(p))
    return "\n\n".join(parts)


def _stream_samples(stream: torch.Tensor, n: int | None, body: int, mode: str, gen: torch.Generator,
                    what: str) -> torch.Tensor:
    """[n, body] windows of a 1-D token stream (random starts, or consecutive chunks from the start)."""
    total = int(stream.numel())
    if total == 0:
        raise EmptyLoaderError(f"{what} tokenises to zero tokens; pass non-empty text.")
    if mode == "random":
        if n is None:
            raise DataError("mode='random' needs an explicit n_samples.")
        if total < body:
            raise DataError(f"{what} has {total} tokens, fewer than one window of {body}; lower seq_len, "
                            "add text, or use a list of strings (padded) instead.")
        # Like LLM-Pruner/Shortened-LLaMA get_examples: start uniform in [0, total - body] (inclusive).
        starts = torch.randint(0, total - body + 1, (n,), generator=gen)
        return torch.stack([stream[s:s + body] for s in starts.tolist()])
    avail = total // body
    if avail == 0:
        raise DataError(f"{what} has {total} tokens, fewer than one chunk of {body}; lower seq_len or add text.")
    if n is not None and n > avail:
        raise DataError(f"{what} holds only {avail} non-overlapping chunks of {body} tokens but n_samples={n}; "
                        "lower n_samples (or pass n_samples=None for all chunks) or seq_len.")
    k = avail if n is None else n
    return stream[: k * body].view(k, body)


def _text_list_samples(texts: list[str], tokenizer, n: int | None, body: int, mode: str,
                       gen: torch.Generator) -> tuple[list[torch.Tensor], int]:
    """One sample per text: random mode picks distinct texts (and a random window in a long one)."""
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise DataError(f"A list source must hold strings; found {bad[0]}. Pass tensors as one LongTensor [N, T].")
    if not kept:
        raise EmptyLoaderError(f"All {len(texts)} texts are empty or whitespace; pass non-empty text.")
    k = len(kept) if n is None else n
    if k > len(kept):
        raise DataError(f"{len(kept)} non-empty texts but n_samples={n}; lower n_samples or pass n_samples=None.")
    order = torch.randperm(len(kept), generator=gen)[:k].tolist() if mode == "random" else list(range(k))
    out = []
    for i in order:
        ids = tokenize_text(tokenizer, kept[i])
        if ids.numel() == 0:
            raise EmptyLoaderError(f"Text #{i} tokenises to zero tokens; remove it.")
        if ids.numel() > body:
            s = int(torch.randint(0, ids.numel() - body + 1, (1,), generator=gen)) if mode == "random" else 0
            ids = ids[s:s + body]
        out.append(ids)
    return out, len(texts) - len(kept)


def calibration_loader(source, tokenizer=None, *, n_samples: int | None = 10, seq_len: int = 128,
                       batch_size: int = 1, seed: int = 0, mode: str = "random", split: str | None = None,
                       add_bos: bool = False, pad_token_id: int | None = None) -> CalibrationData:
    """Calibration batches from a corpus name, text file(s), a list of strings, a ``datasets.Dataset``,
    pre-tokenised ids, or an existing `CalibrationData` (returned unchanged).

    - Corpus names (``wikitext2``: validation by default, ``ptb``: train, ``c4``: the 2k sample; ``split``
      overrides) and text files (UTF-8, a path or a list of paths -- Paths, or strs naming existing
      files -- several joined with ``"\\n\\n"``) are tokenised as one stream
      (``add_special_tokens=False``). ``mode="random"``: ``n_samples`` windows of ``seq_len`` tokens with
      starts drawn uniformly from ``[0, n_tokens - seq_len]`` (may overlap), as seed-000's ``get_examples``;
      ``mode="contiguous"``: consecutive non-overlapping chunks from the start (remainder dropped;
      ``n_samples=None`` takes them all).
    - A list of strings / a Dataset (column ``text``) gives one sample per text: empty texts are dropped;
      random mode picks ``n_samples`` distinct texts (and a random ``seq_len`` window of a longer one),
      contiguous mode the first ``n_samples`` texts truncated to ``seq_len``. Samples are right-padded
      with ``pad_token_id`` (default: the tokenizer's pad, else eos, else 0) to the longest sample;
      ``attention_mask`` is 0 on pads.
    - A LongTensor ``[N, T]`` (or a dict with ``input_ids`` and optional ``attention_mask``) is used as
      given: only ``batch_size`` applies.
    - ``add_bos`` prepends the tokenizer's BOS to every sample (then ``seq_len`` counts it).

    The draw uses a private ``torch.Generator`` seeded with ``seed``: same inputs, same batches.
    """
    if isinstance(source, CalibrationData):
        return source
    if batch_size is None or int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    batch_size = int(batch_size)
    desc = {"mode": mode, "seed": int(seed), "batch_size": batch_size}
    if isinstance(source, dict) or isinstance(source, torch.Tensor):
        return _from_tensors(source, batch_size, desc)
    if mode not in ("random", "contiguous"):
        raise DataError(f"Unknown mode {mode!r}; use 'random' or 'contiguous'.")
    if n_samples is not None and int(n_samples) < 1:
        raise DataError(f"n_samples must be >= 1 (or None for all), got {n_samples}.")
    if int(seq_len) < 2:
        raise DataError(f"seq_len must be >= 2 (a next-token loss needs two tokens), got {seq_len}.")
    seq_len = int(seq_len)
    n = None if n_samples is None else int(n_samples)
    if tokenizer is None:
        raise DataError("Text calibration data needs a tokenizer: pass the tokenizer load_model() returns, "
                        "or pass pre-tokenised input_ids.")
    bos = None
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise DataError("add_bos=True but the tokenizer has no bos_token_id; pass add_bos=False.")
    body = seq_len - (1 if add_bos else 0)
    gen = torch.Generator().manual_seed(int(seed))
    desc.update(seq_len=seq_len, add_bos=bool(add_bos), tokenizer=_tok_name(tokenizer))

    texts = None
    if hasattr(source, "column_names") and not isinstance(source, (str, os.PathLike)):
        if "text" not in source.column_names:
            raise DataError(f"The Dataset has no 'text' column (columns: {source.column_names}); rename it.")
        texts, desc["source"] = list(source["text"]), f"datasets.Dataset[{len(source)}]"
    elif isinstance(source, (list, tuple)) and source and all(_is_path_item(s) for s in source):
        stream_text = _read_text_files([Path(s).expanduser() for s in source])
        desc["source"] = [str(s) for s in source]
    elif isinstance(source, (list, tuple)):
        if not source:
            raise EmptyLoaderError("The list of texts is empty; pass at least one string.")
        texts = list(source)
        digest = hashlib.sha256("\x00".join(map(str, texts)).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        desc["source"] = f"texts[{len(texts)}]:{digest}"
    elif isinstance(source, (str, os.PathLike)):
        s = str(source)
        # A bare corpus name wins over a same-named file in the cwd; pass a Path to force a file.
        if not isinstance(source, os.PathLike) and _looks_like_corpus(s):
            name = canonical_corpus(s)
            sp = _canon_split(name, split or DEFAULT_CALIB_SPLIT[name])
            stream_text = load_corpus_text(name, sp)
            desc.update(source=name, split=sp)
        elif Path(s).expanduser().is_file():
            stream_text, desc["source"] = _read_text_files([Path(s).expanduser()]), s
        elif isinstance(source, os.PathLike) or os.sep in s or Path(s).suffix:
            raise DataError(f"Calibration text file {s} does not exist; pass an existing UTF-8 text file or a "
                            f"corpus name ({', '.join(CORPORA)}).")
        else:
            raise DataError(f"Unknown calibration source {s!r}: not a corpus ({', '.join(CORPORA)}) nor a file; "
                            f"pass a corpus name ({', '.join(CORPORA)}) or the path of an existing UTF-8 text file.")
    else:
        raise DataError(f"Unsupported calibration source of type {type(source).__name__}; pass a corpus name, "
                        "file path(s), a list of strings, a datasets.Dataset, or a LongTensor [N, T].")
    desc.setdefault("split", None)

    pad = _pad_id(tokenizer, pad_token_id)
    if texts is None:
        if not stream_text.strip():
            raise EmptyLoaderError(f"Calibration text from {desc['source']} is empty; pass non-empty text.")
        rows = list(_stream_samples(tokenize_text(tokenizer, stream_text), n, body, mode, gen,
                                    f"Calibration text from {desc['source']}"))
    else:
        rows, dropped = _text_list_samples(texts, tokenizer, n, body, mode, gen)
        if dropped:
            desc["dropped_empty"] = dropped
    if bos is not None:
        rows = [torch.cat([torch.tensor([bos], dtype=torch.long), r]) for r in rows]
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    desc["n_samples"] = len(rows)
    return CalibrationData(_batch(ids, mask, batch_size), desc)


def _from_tensors(source, batch_size: int, desc: dict) -> CalibrationData:
    if isinstance(source, dict):
        if "input_ids" not in source:
            raise DataError(f"A dict source needs 'input_ids' (got keys {sorted(source)}).")
        ids, mask = source["input_ids"], source.get("attention_mask")
    else:
        ids, mask = source, None
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DataError(f"input_ids must be an integer tensor, got {ids.dtype}.")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise EmptyLoaderError(f"input_ids must be a non-empty [N, T] tensor, got shape {tuple(ids.shape)}.")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids.shape):
        raise DataError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}.")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError("attention_mask must hold only 0 and 1.")
    if int(mask.sum()) == 0:
        raise EmptyLoaderError("attention_mask is all zeros: no valid token to calibrate on.")
    ids, mask = ids.to(torch.long), mask.to(torch.long)
    desc.update(source=f"tensor[{ids.shape[0]}x{ids.shape[1]}]", split=None, mode="given",
                n_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]))
    return CalibrationData(_batch(ids, mask, batch_size), desc)
