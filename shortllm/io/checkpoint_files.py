"""Local safetensors checkpoints: reading one tensor at a time, and checking a shard index.

`CheckpointReader` parses the safetensors headers itself and reads each tensor with a plain
`readinto` at its offset: no memory map stays open, so the process's resident memory is only what
it holds (a mapped shard would count its touched pages in RSS until unmapped). Every problem is
found when the checkpoint is opened, before any compute: a shard the index lists but that is absent,
a gap in `-of-N` shard numbering, a truncated file, a tensor whose shape differs from the config's.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from shortllm.errors import CheckpointError, ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelLoadError(f"checkpoint shard {path} is missing; re-download or re-save the checkpoint") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); the file is corrupted or truncated: "
                              "re-download or re-save the checkpoint") from None
    out = {}
    base = 8 + n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dt = _DTYPES.get(meta.get("dtype"))
        if dt is None:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {meta.get('dtype')!r}, which shortllm cannot "
                                  f"read (supported: {', '.join(_DTYPES)})")
        b, e = (int(x) for x in meta["data_offsets"])
        if base + e > size:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} ends at byte {base + e} of a {size}-byte "
                                  "file; re-download or re-save the checkpoint")
        out[key] = TensorEntry(path, dt, tuple(int(s) for s in meta["shape"]), base + b, base + e)
    return out


def _shard_files(root: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, the single file, or a complete -of-N set."""
    index = root / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index ({type(exc).__name__}: {exc}); re-save "
                                  "the checkpoint") from None
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (root / f).is_file()]
        if absent:
            raise ModelLoadError(f"the shard index {index} lists {len(absent)} file(s) absent from {root}: "
                                 f"{', '.join(absent[:5])}; re-download the missing shard(s)")
        return [root / f for f in files]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    found = sorted(root.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"no safetensors weights in {root} (expected {SINGLE_NAME} or {INDEX_NAME} with its "
                             "shards); convert the checkpoint with save_pretrained(..., safe_serialization=True)")
    groups: dict[tuple[str, int], set[int]] = {}
    for p in found:
        m = _SHARD_RE.match(p.name)
        if m:
            groups.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    for (stem, n), have in groups.items():
        missing = sorted(set(range(1, n + 1)) - have)
        if missing:
            names = [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in missing]
            raise ModelLoadError(f"checkpoint {root} is missing shard(s) {', '.join(names[:5])} (and has no "
                                 f"{INDEX_NAME}); re-download the missing file(s)")
    return found


class CheckpointReader:
    """Tensor directory of a local safetensors checkpoint; `read(key)` loads one tensor."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelLoadError(f"checkpoint directory {self.root} does not exist; give a local directory with "
                                 "config.json and *.safetensors (e.g. one written by save_pretrained)")
        self.entries: dict[str, TensorEntry] = {}
        for path in _shard_files(self.root):
            self.entries.update(_read_header(path))
        self.bytes_read = 0

    def has(self, key: str) -> bool:
        return key in self.entries

    def read(self, key: str, dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu") -> Tensor:
        e = self.entries[key]
        t = torch.empty(e.shape, dtype=e.dtype)
        nbytes = e.end - e.begin
        if nbytes != t.numel() * t.element_size():
            raise CheckpointError(f"{e.file}: tensor {key!r} holds {nbytes} bytes but its shape {list(e.shape)} and "
                                  f"dtype need {t.numel() * t.element_size()}; the file is corrupted")
        if nbytes:
            buf = t.reshape(-1).view(torch.uint8).numpy()
            with open(e.file, "rb") as f:
                f.seek(e.begin)
                got = f.readinto(memoryview(buf))
            if got != nbytes:
                raise CheckpointError(f"{e.file} is truncated: read {got} of {nbytes} bytes of {key!r}; re-download "
                                      "the shard")
        self.bytes_read += nbytes
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device)



def check_index(directory: str | os.PathLike, index_name: str = INDEX_NAME) -> dict:
    """Verify a sharded checkpoint: the index maps exactly the tensors its shards hold. Returns the map."""
    from safetensors import safe_open

    d = Path(directory)
    idx = d / index_name
    if not idx.exists():
        return {}
    weight_map = json.loads(idx.read_text())["weight_map"]
    held: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if not (d / shard).is_file():
            raise CheckpointError(f"shard {shard} listed in {idx.name} is missing; the export is incomplete")
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                held[k] = shard
    if held != weight_map:
        extra = sorted(set(held) - set(weight_map))[:5]
        missing = sorted(set(weight_map) - set(held))[:5]
        wrong = sorted(k for k in set(held) & set(weight_map) if held[k] != weight_map[k])[:5]
        raise CheckpointError(f"{idx.name} does not match its shards (unindexed {extra}, missing {missing}, "
                          f"wrong shard {wrong}); the export is corrupt")
    return weight_map
