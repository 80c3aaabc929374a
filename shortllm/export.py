"""Export a pruned model as a checkpoint that loads everywhere, plus a mergekit YAML of the same plan.

`export` writes `save_pretrained` safetensors (sharded above `max_shard_size`, with an index that is
checked against the shards before anything is published), the tokenizer, the generation config and
`shortllm.json` (the plan, the scores' provenance, the config fields prune rewrote, versions). All of
it goes into a temp dir next to `out_dir` that is renamed into place at the end: a crash, a full disk
or a refused overwrite never leaves a partial checkpoint at `out_dir`.

mergekit (PyPI `mergekit`, 0.1.x) is what practitioners use to slice models. Its passthrough merge
handles architectures without per-layer config lists: verified weight for weight here on Llama (and
Mistral shares its code path). With transformers 5.x it fails on every config carrying `layer_types`
(Qwen2, Qwen3, Gemma-2, Gemma-3: "num_hidden_layers (k) must be equal to the number of layer_types
(L)") because it never rewrites that list, and a hand-fixed wrong list would load and silently change
logits; for those, and for GPT-2 with `scale_attn_by_inverse_layer_idx`, use `shortllm.export`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from torch import nn

from ._io import publish_dir, temp_dir_beside
from .errors import ExportError
from .plan import Plan, scores_fingerprint

FORMAT = "shortllm.export/1"
META_FILE = "shortllm.json"
MERGEKIT_BROKEN = ("qwen2", "qwen3", "gemma2", "gemma3_text")


def export(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, plan: Optional[Plan] = None, scores=None,
           max_shard_size: int | str = "2GB", overwrite: bool = False, fused: bool = False) -> Path:
    """Write `model` to `out_dir` atomically; returns the final path.

    `plan` defaults to the one `shortllm.prune` attached to the model. `fused=True` writes the fused
    inference model (`shortllm.fuse`), which loads with `shortllm.load_fused(out_dir)` only. An
    existing `out_dir` is refused (ExportError) unless `overwrite=True`; an unwritable location, a full
    disk or an incomplete shard index raise ExportError and leave nothing behind.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another output dir or pass overwrite=True "
                          "(--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; remove it or choose another output dir")
    plan = plan if plan is not None else getattr(model, "shortllm_plan", None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(out)
    except OSError as exc:
        raise ExportError(f"cannot write next to {out} ({exc}); choose a writable output dir") from exc
    try:
        if fused:
            from .fuse import save_fused

            save_fused(model, tmp, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
            check_index(tmp)
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        meta = {
            "format": FORMAT,
            "fused": bool(fused),
            "plan": plan.to_dict() if plan is not None else None,
            "scores": _scores_meta(scores),
            "config_changes": getattr(model, "shortllm_config_changes", {}),
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        publish_dir(tmp, out, overwrite, ExportError)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, ExportError):
            raise ExportError(f"writing the checkpoint to {out} failed ({exc}); nothing was written there. "
                              "Free disk space or choose a writable output dir") from exc
        raise
    return out




def check_index(directory: str | os.PathLike, index_name: str = "model.safetensors.index.json") -> dict:
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
            raise ExportError(f"shard {shard} listed in {idx.name} is missing; the export is incomplete")
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                held[k] = shard
    if held != weight_map:
        extra = sorted(set(held) - set(weight_map))[:5]
        missing = sorted(set(weight_map) - set(held))[:5]
        wrong = sorted(k for k in set(held) & set(weight_map) if held[k] != weight_map[k])[:5]
        raise ExportError(f"{idx.name} does not match its shards (unindexed {extra}, missing {missing}, "
                          f"wrong shard {wrong}); the export is corrupt")
    return weight_map


def _scores_meta(scores) -> Optional[dict]:
    if scores is None:
        return None
    return {"fingerprint": scores_fingerprint(scores), "meta": scores.meta}


def _versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"shortllm": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def mergekit_yaml(plan: Plan, model_name_or_path: str, dtype: Optional[str] = None) -> str:
    """A mergekit `passthrough` config that builds the same pruned model from `model_name_or_path`.

    One slice per run of kept blocks, `layer_range: [start, end]` 0-based and END-EXCLUSIVE (mergekit's
    convention, the same as Python's). A kept block with a removed branch gets its own slice whose
    `scale` parameter zeroes that branch's output projection (as shortllm.prune does). Architectures
    with `layer_types` (Qwen2/3, Gemma-2/3) get a warning comment: mergekit cannot prune them.
    """
    kinds: dict[int, list[str]] = {}
    for k, b in plan.removed_branches:
        kinds.setdefault(b, []).append(k)
    runs: list[tuple[int, int, list[str]]] = []
    for i in plan.kept:
        k = sorted(kinds.get(i, []))
        if runs and runs[-1][1] == i and not k and not runs[-1][2]:
            runs[-1] = (runs[-1][0], i + 1, [])
        else:
            runs.append((i, i + 1, k))
    lines = [
        f"# mergekit passthrough config written by shortllm: removes blocks {plan.removed} "
        f"(0-based) of {plan.num_layers}",
        "# layer_range is [start, end): 0-based, end-exclusive.",
        f"# metric: {plan.metric}; params {plan.params_before} -> {plan.params_after}",
    ]
    if plan.model_type in MERGEKIT_BROKEN:
        lines.append(f"# WARNING: mergekit 0.1.x does not rewrite layer_types, so it fails (or, with the list fixed "
                     f"by hand, silently changes logits) on {plan.model_type}; use `shortllm prune`/shortllm.export.")
    lines.append("slices:")
    for start, end, br in runs:
        lines += ["  - sources:", f"      - model: {json.dumps(str(model_name_or_path))}",
                  f"        layer_range: [{start}, {end}]"]
        if br:
            lines += ["        parameters:", "          scale:"]
            for kind in br:
                lines.append(f"            - filter: {_MK_FILTER[kind]}")
                lines.append("              value: 0.0")
            lines.append("            - value: 1.0")
    lines.append("merge_method: passthrough")
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


_MK_FILTER = {"attn": "o_proj", "mlp": "down_proj"}


from . import _make_callable  # noqa: E402

_make_callable(__name__)  # `shortllm.export(...)` keeps working after `import shortllm.export`
