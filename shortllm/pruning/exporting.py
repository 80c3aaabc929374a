"""Export a pruned model as a checkpoint that loads in plain transformers.

`export` writes `save_pretrained` safetensors (sharded above `max_shard_size`, with an index that is
checked against the shards before anything is published), the tokenizer, the generation config and
`shortllm.json` (the plan, the scores' provenance, the config fields prune rewrote, versions). All of
it goes into a temp dir next to `out_dir` that is renamed into place at the end: a crash, a full disk
or a refused overwrite never leaves a partial checkpoint at `out_dir`.

`format="gguf"` writes one GGUF file instead (`shortllm.io.gguf_export`: llama and gemma3 models, matrices
as f32/f16/bf16/q8_0, the tokenizer copied from `tokenizer_from=`, a GGUF such as the built-in's original).

The same plan as a mergekit config: `shortllm.pruning.mergekit`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from torch import nn

from shortllm.errors import ExportError
from shortllm.io.atomic import publish_dir, temp_dir_beside
from shortllm.io.checkpoint_files import check_index
from shortllm.io.stamp import versions
from shortllm.pruning.plans import Plan, scores_fingerprint

FORMAT = "shortllm.export/1"
META_FILE = "shortllm.json"


def export(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, plan: Optional[Plan] = None, scores=None,
           max_shard_size: int | str = "2GB", overwrite: bool = False, fused: bool = False,
           format: str = "safetensors", quant: Optional[str] = None,
           tokenizer_from: Optional[str | os.PathLike] = None) -> Path:
    """Write `model` to `out_dir` atomically; returns the final path.

    `format="gguf"`: `out_dir` is the .gguf FILE to write, `quant` one of f32/f16/bf16/q8_0 (default f16),
    `tokenizer_from` a GGUF whose tokenizer metadata is copied (needed by llama.cpp); `tokenizer`,
    `fused` and `max_shard_size` do not apply there. `quant`/`tokenizer_from` only apply to GGUF.

    `plan` defaults to the one `shortllm.prune` attached to the model. `fused=True` writes the fused
    inference model (`shortllm.fuse`), which loads with `shortllm.load_fused(out_dir)` only. An
    existing `out_dir` is refused (ExportError) unless `overwrite=True`; an unwritable location, a full
    disk or an incomplete shard index raise ExportError and leave nothing behind.
    """
    if format == "gguf":
        return _export_gguf(model, out_dir, plan, quant, tokenizer_from, overwrite, tokenizer, fused)
    if format != "safetensors":
        raise ExportError(f"format={format!r}: choose 'safetensors' (a transformers checkpoint dir) or 'gguf'")
    if quant is not None or tokenizer_from is not None:
        raise ExportError("quant= and tokenizer_from= only apply to format='gguf'; drop them or pass format='gguf'")
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
            from shortllm.pruning.fusion import save_fused

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
            "versions": versions(),
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


def _export_gguf(model: nn.Module, path, plan: Optional[Plan], quant: Optional[str], tokenizer_from,
                 overwrite: bool, tokenizer, fused: bool) -> Path:
    from shortllm.io.gguf_export import write_gguf
    from shortllm.io.gguf_files import plan_metadata

    if fused:
        raise ExportError("fused=True does not apply to format='gguf' (llama.cpp runs the stock architecture); "
                          "drop it")
    if tokenizer is not None:
        raise ExportError("tokenizer= does not apply to format='gguf' (GGUF keeps llama.cpp's tokenizer metadata); "
                          "pass tokenizer_from= a GGUF file instead")
    plan = plan if plan is not None else getattr(model, "shortllm_plan", None)
    if plan is not None and plan.removed_branches:
        raise ExportError(f"the plan removes branches {plan.removed_branches}; llama.cpp would still run them "
                          "(their weights are zeroed, not gone): only whole-block plans export to GGUF")
    extra = plan_metadata(plan.to_dict()) if plan is not None else None
    return write_gguf(model, path, quant=quant or "f16", tokenizer_from=tokenizer_from, overwrite=overwrite,
                      extra_metadata=extra)


def _scores_meta(scores) -> Optional[dict]:
    if scores is None:
        return None
    return {"fingerprint": scores_fingerprint(scores), "meta": scores.meta}
