"""Out-of-core scoring state: calibration states in memory or on disk, the meta-device skeleton, block loading.

The checkpoint is read through `shortllm.io.checkpoint_files.CheckpointReader`.

`CheckpointReader` parses the safetensors headers itself and reads each tensor with a plain
`readinto` at its offset: no memory map stays open, so the process's resident memory is only what
it holds (a mapped shard would count its touched pages in RSS until unmapped). Every problem is
found when the checkpoint is opened, before any compute: a shard the index lists but that is absent,
a gap in `-of-N` shard numbering, a truncated file, a tensor whose shape differs from the config's.

`StateStore` keeps hidden states ([B, T, D] per batch) in memory, or spills them to one file per
state in a temporary directory when they would not fit (checked against free disk space first).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor, nn

from shortllm.errors import CheckpointError, DiskSpaceError, ModelLoadError
from shortllm.io.checkpoint_files import CheckpointReader
from shortllm.model.fingerprint import param_key, weight_sample


class StateStore:
    """Hidden states by key, in memory or (spill=True) as raw files in a temporary directory."""

    def __init__(self, spill: bool, spill_dir: Optional[str | os.PathLike] = None, need_bytes: int = 0):
        self.spill = spill
        self.mem: dict[Hashable, Tensor] = {}
        self.meta: dict[Hashable, tuple[torch.dtype, tuple[int, ...], Path]] = {}
        self.dir: Optional[Path] = None
        self.bytes_written = 0
        if spill:
            parent = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(parent).free
            if free < need_bytes:
                raise DiskSpaceError(f"spilling the calibration states needs about {need_bytes / 2**30:.2f} GiB in "
                                     f"{parent} but only {free / 2**30:.2f} GiB is free; free space there, point "
                                     "spill_dir (--spill-dir) at a larger disk, or use fewer calibration tokens")
            self.dir = Path(tempfile.mkdtemp(prefix="shortllm-states-", dir=parent))

    def _path(self, key: Hashable) -> Path:
        return self.dir / ("_".join(str(k) for k in (key if isinstance(key, tuple) else (key,))) + ".bin")

    def put(self, key: Hashable, t: Tensor) -> None:
        if not self.spill:
            self.mem[key] = t
            return
        path = self._path(key)
        c = t.detach().contiguous().cpu()
        try:
            with open(path, "wb") as f:
                f.write(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            raise DiskSpaceError(f"could not write spilled state {path} ({exc.strerror or exc}); free space in "
                                 f"{self.dir.parent} or set spill_dir (--spill-dir) to a larger disk") from None
        self.bytes_written += c.numel() * c.element_size()
        self.meta[key] = (t.dtype, tuple(t.shape), path)

    def get(self, key: Hashable, device: torch.device | str = "cpu") -> Tensor:
        if not self.spill:
            return self.mem[key]
        dtype, shape, path = self.meta[key]
        t = torch.empty(shape, dtype=dtype)
        with open(path, "rb") as f:
            f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t.to(device)

    def pop(self, key: Hashable) -> None:
        if not self.spill:
            self.mem.pop(key, None)
            return
        meta = self.meta.pop(key, None)
        if meta is not None:
            meta[2].unlink(missing_ok=True)

    def close(self) -> None:
        self.mem.clear()
        self.meta.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ---- skeleton and tensors ---------------------------------------------------------------------------

def build_skeleton(path: Path, dtype: Optional[torch.dtype], attn_implementation: Optional[str]) -> nn.Module:
    """The model with every parameter on the meta device and real buffers (rotary frequencies...)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; give a Hugging Face checkpoint directory "
                             "(save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from None
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    return model.eval()


class BlockLoader:
    """Materialises and frees a module's parameters from the checkpoint, checked against the skeleton."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype, device: torch.device):
        self.model, self.reader, self.dtype, self.device = model, reader, dtype, device
        self.samples: dict[str, bytes] = {}
        prefix = getattr(model, "base_model_prefix", "") or ""
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.keys: dict[str, str] = {}
        missing = []
        params = dict(model.named_parameters(remove_duplicate=False))
        emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
        emb_name = next((n for n, p in params.items() if emb is not None and p is emb.weight), None)
        renamed = _renamed_keys(model, reader)
        for name, p in params.items():
            cands = [renamed[name]] if name in renamed else []
            cands.append(name)
            if prefix and name.startswith(prefix + "."):
                cands.append(name[len(prefix) + 1:])
            elif prefix:
                cands.append(f"{prefix}.{name}")
            key = next((k for k in cands if reader.has(k)), None)
            if key is None and emb_name is not None and name != emb_name and (
                    p is params[emb_name] or (tied and out_emb is not None and p is out_emb.weight)):
                key = self.keys.get(emb_name)  # tied LM head: stored once, as the input embedding
            if key is None:
                missing.append(name)
                continue
            e = reader.entries[key]
            if tuple(e.shape) != tuple(p.shape):
                raise CheckpointError(f"{e.file}: tensor {key!r} has shape {list(e.shape)} but the config in "
                                      f"{reader.root / 'config.json'} implies {list(p.shape)}; the config does not "
                                      "match the weights (wrong config.json or a corrupted checkpoint)")
            self.keys[name] = key
        if missing:
            raise CheckpointError(f"the checkpoint {reader.root} has no tensor for {len(missing)} parameter(s) of the "
                                  f"model its config.json describes, e.g. {missing[:4]}; the config does not match "
                                  "the weights (or a shard is missing from the index)")

    def load(self, module: nn.Module, prefix: str, requires_grad: Sequence[str] = (), recurse: bool = True) -> None:
        for name, _ in list(module.named_parameters(recurse=recurse, remove_duplicate=False)):
            full = f"{prefix}.{name}" if prefix else name
            t = self.reader.read(self.keys[full], self.dtype, self.device)
            if full not in self.samples and t.is_floating_point():
                self.samples[full] = weight_sample(t)
            _set_param(module, name, nn.Parameter(t, requires_grad=name in requires_grad))

    @staticmethod
    def free(module: nn.Module, recurse: bool = True) -> None:
        for name, p in list(module.named_parameters(recurse=recurse, remove_duplicate=False)):
            _set_param(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False))
        release_freed_memory()

    def fingerprint(self) -> str:
        """`weights_fingerprint` of the loaded model, from the samples taken as tensors were read."""
        h = hashlib.sha256()
        seen: set[str] = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if self.keys[name] in seen:  # a tied weight is listed once by the loaded model
                continue
            seen.add(self.keys[name])
            h.update(param_key(name, p.shape))
            if name in self.samples:
                h.update(self.samples[name])
        return h.hexdigest()[:32]


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise): a freed block's weights must not
    raise the peak RSS of the next one through fragmentation. No-op where glibc is absent."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _renamed_keys(model: nn.Module, reader: CheckpointReader) -> dict[str, str]:
    """model parameter name -> checkpoint key, through transformers' own checkpoint renamings (GPT-NeoX's
    `embed_out` is the model's `lm_head`, legacy `gamma`/`beta`, base-model prefixes)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # older transformers: plain names plus the prefix fallback
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    out: dict[str, str] = {}
    for key in reader.entries:
        new, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                         meta_sd)
        if pattern is not None:
            from shortllm.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{reader.entries[key].file}: tensor {key!r} is converted by transformers when "
                                        "loading (e.g. experts fused into one tensor); out-of-core scoring needs one "
                                        "stored tensor per parameter: re-save the checkpoint with save_pretrained "
                                        "from a transformers that stores the model's own layout, or score in memory")
        out.setdefault(new, key)
    return out


def _set_param(module: nn.Module, name: str, value: nn.Parameter) -> None:
    path, _, leaf = name.rpartition(".")
    (module.get_submodule(path) if path else module)._parameters[leaf] = value
