"""GGUF files: read the header, check it against a pruning plan, and prune it byte for byte.

`prune_gguf` keeps every remaining tensor's bytes and quantization type (nothing is dequantized or
requantized), renumbers ``blk.N.*`` to the kept blocks' new positions, rewrites ``{arch}.block_count`` and
filters every per-layer metadata array generically: an array under the ``{arch}.`` namespace whose length
equals the block count is one value per layer (head counts, feed-forward lengths, sliding-window flags,
layer types, ...), so it keeps the kept layers' entries. Everything else (tokenizer, general.*, rope, ...) is
copied unchanged. This is the bug class of llama.cpp issue 27976 (`llama-quantize --prune-layers` updates
block_count but not the arrays, and the file does not load).

Sliding-window layouts (why some plans are refused): llama.cpp does not read which layers slide from the
file for Gemma-2/3; it derives it from a fixed period (``set_swa_pattern(6)`` for gemma3: layer i slides
unless i % 6 == 5; period 2 for gemma2), and transformers' GGUF loader rebuilds ``layer_types`` from the
same default period. No metadata key changes that, so a plan whose kept layers do not follow the period at
their NEW positions would silently turn local layers into global ones (or back). Such plans are refused
with PlanError; `best_expressible_blocks` picks the best plan that keeps the pattern.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from shortllm.errors import ExportError, ModelLoadError, PlanError
from shortllm.io.atomic import atomic_path

# Readers derive sliding vs global attention from this period (llama.cpp set_swa_pattern(n):
# layer i slides when i % n < n - 1); transformers' GGUF loader uses the same config default.
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
# Hugging Face model_type -> GGUF general.architecture, for the architectures whose names differ.
GGUF_ARCH = {"gemma3_text": "gemma3", "mistral": "llama"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_VIRTUAL = "GGUF."  # GGUFReader's own header pseudo-fields (version, counts): not metadata


def gguf_arch_for(model_type: str) -> str:
    """The GGUF architecture name of a Hugging Face ``model_type``."""
    return GGUF_ARCH.get(model_type, model_type)


@dataclass
class GGUFHeader:
    """What a GGUF file says about itself: architecture, block count, metadata, tensor names per block."""

    path: Path
    arch: str
    block_count: int
    metadata: dict[str, Any]
    block_tensors: dict[int, list[str]] = field(default_factory=dict)  # block -> suffixes ("attn_q.weight")
    other_tensors: list[str] = field(default_factory=list)

    def per_layer_keys(self) -> list[str]:
        """Metadata arrays with one entry per block (under the ``{arch}.`` namespace)."""
        return [k for k, v in self.metadata.items()
                if k.startswith(f"{self.arch}.") and isinstance(v, list) and len(v) == self.block_count]


def _reader(path: str | os.PathLike):
    try:
        from gguf import GGUFReader
    except ImportError as e:  # a dependency, but keep the message actionable
        raise ModelLoadError(f"reading GGUF files needs the `gguf` package ({e}); pip install gguf") from e
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"No GGUF file at {p}; pass an existing .gguf file")
    try:
        return GGUFReader(str(p), "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelLoadError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e}); pass a GGUF file "
                             "(magic 'GGUF', version 2 or 3)") from e


def _field_value(f) -> Any:
    return f.contents()


def read_header(path: str | os.PathLike, require_blocks: bool = True) -> GGUFHeader:
    """Parse ``path``'s metadata and tensor names (no tensor data is read). ``require_blocks=False`` also
    accepts a file without ``{arch}.block_count`` (block_count 0; e.g. a tokenizer-only GGUF)."""
    r = _reader(path)
    meta = {name: _field_value(f) for name, f in r.fields.items() if not name.startswith(_VIRTUAL)}
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{path} has no general.architecture; it is not a model GGUF file")
    n = meta.get(f"{arch}.block_count", None if require_blocks else 0)
    if not isinstance(n, int) or (n < 1 and require_blocks):
        raise ModelLoadError(f"{path} has no {arch}.block_count; shortllm can only prune GGUF files of "
                             "block-structured models")
    blocks: dict[int, list[str]] = {}
    other = []
    for t in r.tensors:
        m = _BLK.match(t.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            other.append(t.name)
    return GGUFHeader(Path(path), arch, n, meta, blocks, other)


def sliding_layers(arch: str, num_layers: int) -> Optional[list[bool]]:
    """Which layers the readers (llama.cpp, transformers' GGUF loader) treat as sliding-window for a file of
    ``arch`` with ``num_layers`` blocks; None when the architecture has no fixed interleave."""
    period = SWA_PERIOD.get(arch)
    if period is None:
        return None
    return [i % period < period - 1 for i in range(num_layers)]


def layout_problem(arch: str, num_layers: int, removed: Sequence[int]) -> Optional[str]:
    """Why GGUF cannot express removing ``removed`` from an ``arch`` model of ``num_layers`` blocks (None
    when it can): the kept blocks must be sliding/global exactly where the fixed period says at their new
    positions."""
    before = sliding_layers(arch, num_layers)
    if before is None:
        return None
    gone = set(removed)
    kept = [i for i in range(num_layers) if i not in gone]
    after = sliding_layers(arch, len(kept))
    bad = [(old, new) for new, old in enumerate(kept) if before[old] != after[new]]
    if not bad:
        return None
    kind = {True: "sliding-window", False: "global"}
    old, new = bad[0]
    return (f"GGUF readers derive {arch}'s sliding vs global layers from a fixed period of {SWA_PERIOD[arch]} "
            f"(llama.cpp set_swa_pattern; no metadata key overrides it), so removing blocks {sorted(gone)} would "
            f"turn {len(bad)} kept block(s) into the other attention kind (block {old}, {kind[before[old]]}, "
            f"would run at position {new} as {kind[after[new]]})")


def check_layout(arch: str, num_layers: int, removed: Sequence[int]) -> None:
    """PlanError naming the constraint when GGUF cannot express the plan."""
    problem = layout_problem(arch, num_layers, removed)
    if problem:
        raise PlanError(f"{problem}; choose a plan that keeps the period (make_gguf_plan / "
                        "`shortllm prune --gguf-expressible`), or export a safetensors checkpoint instead")


def best_expressible_blocks(values: Sequence[float], arch: str, k: int,
                            allowed: Optional[Sequence[int]] = None) -> list[int]:
    """The ``k`` blocks with the lowest total score whose removal GGUF can express (see `layout_problem`).

    Dynamic programming over (blocks seen, blocks kept): the kept blocks, in order, must match the period's
    pattern at their new positions. ``allowed``: blocks that may be removed (protection), default all."""
    L = len(values)
    pattern_before = sliding_layers(arch, L)
    removable = set(range(L) if allowed is None else allowed)
    if pattern_before is None:
        order = sorted(removable, key=lambda i: (values[i], i))
        if k > len(order):
            raise PlanError(f"cannot remove {k} blocks: only {len(order)} are removable")
        return sorted(order[:k])
    keep_n = L - k
    target = sliding_layers(arch, keep_n)
    inf = float("inf")
    # cost[i][j]: least removed-score using blocks 0..i-1 and keeping j of them
    cost = [[inf] * (keep_n + 1) for _ in range(L + 1)]
    choice: list[list[Optional[bool]]] = [[None] * (keep_n + 1) for _ in range(L + 1)]
    cost[0][0] = 0.0
    for i in range(L):
        for j in range(keep_n + 1):
            c = cost[i][j]
            if c == inf:
                continue
            if i in removable and c + values[i] < cost[i + 1][j]:  # remove block i
                cost[i + 1][j], choice[i + 1][j] = c + values[i], False
            if j < keep_n and pattern_before[i] == target[j] and c < cost[i + 1][j + 1]:  # keep it at j
                cost[i + 1][j + 1], choice[i + 1][j + 1] = c, True
    if cost[L][keep_n] == inf:
        raise PlanError(f"no removal of {k} blocks (within the allowed blocks) keeps {arch}'s sliding-window "
                        f"period of {SWA_PERIOD[arch]}; remove a different number of blocks or lower protect")
    removed, j = [], keep_n
    for i in range(L, 0, -1):
        if choice[i][j]:
            j -= 1
        else:
            removed.append(i - 1)
    return sorted(removed)


def check_plan_matches(header: GGUFHeader, num_layers: int, removed: Sequence[int], model_type: str = "",
                       removed_branches: Sequence = ()) -> None:
    """PlanError unless the plan fits this file: same block count and architecture, complete blocks, no
    branch removals (GGUF cannot zero a branch without requantizing), a layout the readers can express."""
    where = header.path
    if removed_branches:
        raise PlanError(f"the plan removes branches {list(removed_branches)}; a GGUF file keeps its tensors' bytes, "
                        "so only whole blocks can be removed: use a blocks-only plan")
    if num_layers != header.block_count:
        raise PlanError(f"the plan is for {num_layers} blocks but {where} has {header.arch}.block_count = "
                        f"{header.block_count}; make the plan on this file (shortllm score {where.name} ...)")
    if model_type and gguf_arch_for(model_type) != header.arch:
        raise PlanError(f"the plan is for a {model_type} model but {where} is a {header.arch} GGUF; make the "
                        "plan on this file")
    present = set(header.block_tensors)
    missing = sorted(set(range(header.block_count)) - present)
    extra = sorted(present - set(range(header.block_count)))
    if missing or extra:
        raise PlanError(f"{where} declares {header.block_count} blocks but has tensors for blocks "
                        f"{sorted(present)} (missing {missing}, beyond the count {extra}); the file is "
                        "inconsistent, so it cannot be pruned safely")
    bad = [i for i in removed if not 0 <= int(i) < header.block_count]
    if bad:
        raise PlanError(f"blocks {bad} are out of range for {where} ({header.block_count} blocks)")
    if len(set(removed)) >= header.block_count:
        raise PlanError("the plan removes every block; keep at least one")
    check_layout(header.arch, header.block_count, removed)


def prune_gguf(src: str | os.PathLike, dst: str | os.PathLike, removed: Sequence[int], *, num_layers: int,
               model_type: str = "", removed_branches: Sequence = (), overwrite: bool = False,
               extra_metadata: Optional[dict] = None) -> Path:
    """Write ``src`` without the ``removed`` blocks to ``dst`` (atomically; nothing written on any error).

    ``num_layers``/``model_type``/``removed_branches`` are the plan's and are checked against the file first.
    ``extra_metadata`` (str values) is added under its own keys (e.g. ``shortllm.plan``)."""
    from gguf import GGUFValueType, GGUFWriter

    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite:
        raise ExportError(f"{dst} already exists; choose another output file or pass overwrite=True (--overwrite)")
    if dst.exists() and dst.is_dir():
        raise ExportError(f"{dst} is a directory; pass a .gguf file path")
    header = read_header(src)
    check_plan_matches(header, num_layers, removed, model_type, removed_branches)
    gone = {int(i) for i in removed}
    kept = [i for i in range(header.block_count) if i not in gone]
    new_index = {old: new for new, old in enumerate(kept)}
    per_layer = set(header.per_layer_keys())
    r = _reader(src)
    try:
        with atomic_path(dst) as tmp:
            w = GGUFWriter(str(tmp), header.arch)
            align = header.metadata.get("general.alignment")
            if isinstance(align, int):
                w.data_alignment = align
            for name, f in r.fields.items():
                if name.startswith(_VIRTUAL) or name == "general.architecture":
                    continue  # the writer adds the architecture itself
                vtype = f.types[0]
                value = f.contents()
                sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
                if name == f"{header.arch}.block_count":
                    value = len(kept)
                elif name in per_layer:
                    value = [value[i] for i in kept]
                w.add_key_value(name, value, vtype, sub_type=sub)
            for key, val in (extra_metadata or {}).items():
                w.add_key_value(key, str(val), GGUFValueType.STRING)
            for t in r.tensors:
                m = _BLK.match(t.name)
                name = t.name
                if m:
                    old = int(m.group(1))
                    if old in gone:
                        continue
                    name = f"blk.{new_index[old]}.{m.group(2)}"
                w.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            w.close()
    except OSError as exc:
        raise ExportError(f"writing {dst} failed ({exc}); nothing was written there. Free disk space or choose "
                          "a writable path") from exc
    return dst


def plan_metadata(plan_dict: dict) -> dict:
    """The ``shortllm.*`` keys a pruned GGUF carries (removed blocks, metric, source) as JSON strings."""
    keep = {k: plan_dict.get(k) for k in ("num_layers", "removed", "metric", "mode", "ratio", "params_before",
                                           "params_after", "model_name", "created")}
    return {"shortllm.plan": json.dumps(keep, default=str)}
