"""Checkpoints of `shortllm.retrain`: trainable weights and AdamW state as safetensors, scalars as JSON.

``out_dir/checkpoints/step-00000040/{trainable.safetensors, optimizer.safetensors, state.json}``: each
checkpoint is written into a temp dir beside it and renamed into place (``os.replace``), so a run killed
at any point leaves only complete checkpoints; the newest ``keep`` are kept. Nothing is pickled: the
optimizer's per-parameter tensors are stored under ``"{param_index}.{key}"`` and its non-tensor state
in ``state.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from shortllm.errors import CheckpointError


def model_fingerprint(model: nn.Module) -> str:
    # names, shapes and exact float64 sums of the starting weights: cheap, and it changes with any edit
    h = hashlib.sha256()
    for n, p in model.state_dict().items():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype}:".encode())
        if p.is_floating_point():
            h.update(repr(float(torch.sum(p.detach(), dtype=torch.float64))).encode())
    return h.hexdigest()



def checkpoint_dirs(root: Path) -> list[Path]:
    d = root / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def save_checkpoint(root: Path, step: int, params: dict, opt: torch.optim.Optimizer, state: dict, keep: int) -> None:
    from safetensors.torch import save_file

    ckdir = root / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=ckdir))
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        tensors, scalars = {}, {}
        index = {id(p): i for i, p in enumerate(params.values())}
        for p, st in opt.state.items():
            for k, v in st.items():
                key = f"{index[id(p)]}.{k}"
                if torch.is_tensor(v):
                    tensors[key] = v.detach().contiguous().cpu()
                else:
                    scalars[key] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_scalars": scalars}, indent=1))
        final = ckdir / f"step-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep] + list(ckdir.glob(".tmp-step-*")):
        shutil.rmtree(old, ignore_errors=True)  # older checkpoints and temp dirs of a killed earlier run


def load_checkpoint(ck: Path, params: dict, opt: torch.optim.Optimizer, expect: Optional[dict] = None) -> dict:
    """Load weights into ``params`` and state into ``opt``; return the JSON state. Every key of ``expect``
    (run identity: format, config, data and model fingerprints) must match before anything is touched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((ck / "state.json").read_text())
        weights = load_file(str(ck / "trainable.safetensors"))
        opt_t = load_file(str(ck / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"Checkpoint {ck} is unreadable ({e}); delete that folder to resume from the "
                              "previous checkpoint.") from e
    for k, v in (expect or {}).items():
        if state.get(k) != v:
            raise CheckpointError(f"Cannot resume from {ck}: its {k} differs from this run's (checkpoints are "
                                  f"tied to the starting model, data and config); use the same {k} or a new out_dir.")
    if set(weights) != set(params):
        raise CheckpointError(f"Checkpoint {ck} holds other parameters than this run trains; it belongs to "
                              "another model or method: use a new out_dir.")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    sd = opt.state_dict()
    plist = list(params.values())
    per: dict[int, dict] = {}
    for key, v in list(opt_t.items()) + list(state.get("optimizer_scalars", {}).items()):
        i, k = key.split(".", 1)
        per.setdefault(int(i), {})[k] = v.to(plist[int(i)].device) if torch.is_tensor(v) else v
    sd["state"] = per
    opt.load_state_dict(sd)
    return state
