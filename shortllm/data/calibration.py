"""Calibration and evaluation text: named corpora under ``$SHORTLLM_DATA`` and calibration loaders.

The named corpora (``wikitext2``, ``ptb``, ``c4``; row semantics and the hub fallback) live in
`shortllm.data.corpora`. The calibration loader (`calibration_loader`) turns any
text source into fixed, seeded batches.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from shortllm.data.corpora import (
    CORPORA,
    _canon_split,
    canonical_corpus,
    load_corpus_text,
    read_utf8,
)
from shortllm.errors import DataError, EmptyLoaderError

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
        parts.append(read_utf8(p))
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
