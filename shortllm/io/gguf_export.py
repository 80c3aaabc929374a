"""Write a (pruned) Hugging Face model as a GGUF file that llama.cpp and transformers' GGUF loader read.

Architectures: Llama (``llama``) and Gemma-3 text (``gemma3_text`` -> GGUF ``gemma3``). Tensor names come
from gguf-py's own tables (`gguf.get_tensor_name_map`), and the two conventions llama.cpp's converter
applies are reproduced: Llama's q/k rows are permuted from the HF rotary layout (two halves) to the
interleaved one; Gemma's RMSNorm weights are stored as ``1 + w`` (HF computes ``x * (1 + w)``). Both are
undone by transformers' GGUF loader, which the tests use as the independent reader.

Types: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (gguf.quants; a matrix whose rows are not a
multiple of 32 falls back to f16 under q8_0, as llama.cpp's converter does); vectors (norms) stay f32.
The tokenizer is not rebuilt from HF files: pass ``tokenizer_from=`` a GGUF (e.g. the built-in's original
file) whose ``tokenizer.*`` metadata is copied; without it the file loads in transformers (weights only)
but not in llama.cpp, which needs a vocabulary.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from shortllm.errors import ExportError, PlanError, UnsupportedModelError
from shortllm.io.atomic import atomic_path
from shortllm.io.gguf_files import gguf_arch_for, read_header, sliding_layers

QUANTS = ("f32", "f16", "bf16", "q8_0")
SUPPORTED = ("llama", "gemma3_text")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype values (general.file_type)


def _rope_theta(cfg, layer_type: Optional[str] = None) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    if theta is None:
        theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ExportError("the config has no rope_theta; cannot write the GGUF rope metadata")
    rtype = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    if rtype not in ("default", None):
        raise ExportError(f"rope_type={rtype!r}: only plain RoPE is written to GGUF by shortllm; export a "
                          "safetensors checkpoint instead")
    return float(theta)


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _check_supported(cfg) -> None:
    mt = getattr(cfg, "model_type", "")
    if mt not in SUPPORTED:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(SUPPORTED)}, not model_type={mt!r}; export "
                                    "a safetensors checkpoint (format='safetensors') instead")
    if mt == "gemma3_text":
        hd = _head_dim(cfg)
        if float(getattr(cfg, "query_pre_attn_scalar", hd)) != float(hd):
            raise ExportError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} != head_dim={hd}: llama.cpp "
                              "scales Gemma-3 attention by 1/sqrt(head_dim), so this model cannot be written "
                              "to GGUF faithfully")
        for k in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(cfg, k, None):
                raise ExportError(f"{k}={getattr(cfg, k)}: llama.cpp's Gemma-3 graph has no such capping")
        types = list(getattr(cfg, "layer_types", None) or [])
        want = sliding_layers("gemma3", cfg.num_hidden_layers)
        if types and [t == "sliding_attention" for t in types] != want:
            bad = [i for i, (t, w) in enumerate(zip(types, want)) if (t == "sliding_attention") != w]
            raise PlanError(f"this model's layer_types put sliding/global attention at other positions than "
                            "GGUF readers derive for Gemma-3 (a fixed period of 6: llama.cpp set_swa_pattern; no "
                            f"metadata key overrides it): layers {bad} differ. Prune with a plan that keeps the "
                            "period (make_gguf_plan, `shortllm prune --gguf-expressible`) or export safetensors "
                            "instead")


def _metadata(w, cfg, arch: str, quant: str, name: str) -> None:
    L = int(cfg.num_hidden_layers)
    hd = _head_dim(cfg)
    w.add_name(name)
    w.add_uint32(f"{arch}.block_count", L)
    w.add_uint32(f"{arch}.context_length", int(cfg.max_position_embeddings))
    w.add_uint32(f"{arch}.embedding_length", int(cfg.hidden_size))
    w.add_uint32(f"{arch}.feed_forward_length", int(cfg.intermediate_size))
    w.add_uint32(f"{arch}.attention.head_count", int(cfg.num_attention_heads))
    w.add_uint32(f"{arch}.attention.head_count_kv", int(cfg.num_key_value_heads))
    w.add_uint32(f"{arch}.attention.key_length", hd)
    w.add_uint32(f"{arch}.attention.value_length", hd)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))
    w.add_uint32(f"{arch}.vocab_size", int(cfg.vocab_size))
    if arch == "gemma3":
        w.add_float32(f"{arch}.rope.freq_base", _rope_theta(cfg, "full_attention"))
        w.add_uint32(f"{arch}.attention.sliding_window", int(cfg.sliding_window))
    else:
        w.add_float32(f"{arch}.rope.freq_base", _rope_theta(cfg))
        w.add_uint32(f"{arch}.rope.dimension_count", hd)
    w.add_uint32("general.file_type", _FILE_TYPE[quant])
    w.add_uint32("general.quantization_version", 2)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout (first half / second half of each head) -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, t: torch.Tensor, quant: str):
    """(numpy data, GGML type) for one tensor under ``quant``."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim <= 1 or quant == "f32":
        return np.ascontiguousarray(a, dtype=np.float32), Q.F32
    if quant == "f16" or (quant == "q8_0" and a.shape[-1] % 32 != 0):
        return a.astype(np.float16), Q.F16
    qtype = Q.BF16 if quant == "bf16" else Q.Q8_0
    return quants.quantize(a, qtype), qtype


def write_gguf(model: nn.Module, path: str | os.PathLike, quant: str = "f16",
               tokenizer_from: Optional[str | os.PathLike] = None, overwrite: bool = False,
               extra_metadata: Optional[dict] = None) -> Path:
    """Write ``model`` (a llama or gemma3_text causal LM, pruned or not) to ``path`` as GGUF, atomically."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFValueType, GGUFWriter, get_tensor_name_map

    if quant not in QUANTS:
        raise ExportError(f"quant={quant!r}: choose one of {', '.join(QUANTS)}")
    cfg = model.config
    _check_supported(cfg)
    out = Path(path).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another output file or pass overwrite=True")
    arch = gguf_arch_for(cfg.model_type)
    arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch and isinstance(k, MODEL_ARCH))
    L = int(cfg.num_hidden_layers)
    tmap = get_tensor_name_map(arch_enum, L)
    tok_fields = []
    if tokenizer_from is not None:
        src = read_header(tokenizer_from, require_blocks=False)
        if src.arch != arch:
            raise ExportError(f"tokenizer_from={tokenizer_from} is a {src.arch} GGUF, the model is {arch}; pass the "
                              "GGUF the model came from")
        tok_fields = [k for k in src.metadata if k.startswith("tokenizer.")]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    tensors = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp falls back to token_embd for the output when output.weight is absent
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of {cfg.model_type}; this model is not one "
                              "llama.cpp's converter knows, so it cannot be written as GGUF")
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            t = _permute(t, int(heads))
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            t = t.to(torch.float32) + 1.0
        tensors.append((new, t))
    if tokenizer_from is not None:
        from gguf import GGUFReader
        rf = GGUFReader(str(tokenizer_from), "r").fields
    try:
        with atomic_path(out) as tmp:
            w = GGUFWriter(str(tmp), arch)
            _metadata(w, cfg, arch, quant, str(getattr(cfg, "_name_or_path", "") or cfg.model_type))
            for k in tok_fields:
                f = rf[k]
                sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
                w.add_key_value(k, f.contents(), f.types[0], sub_type=sub)
            for key, val in (extra_metadata or {}).items():
                w.add_key_value(key, str(val), GGUFValueType.STRING)
            for name, t in tensors:
                data, qtype = _encode(name, t, quant)
                w.add_tensor(name, data, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            w.close()
    except OSError as exc:
        raise ExportError(f"writing {out} failed ({exc}); nothing was written there") from exc
    return out
