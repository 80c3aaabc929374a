"""Fingerprints that tie scores and plans to the model they were made on.

The weights fingerprint samples 64 values of every parameter and hashes them after rounding to
bfloat16, without the storage dtype: a bf16 checkpoint scored in bf16 (out-of-core) and the same
checkpoint loaded in fp32 or fp64 give the same fingerprint, since fp32 ⊃ bf16 exactly and
transformers' fp32 -> bf16 cast rounds the same way. fp16 rounds differently and does not match.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

SAMPLES_PER_PARAM = 64


def weight_sample(t: Tensor) -> bytes:
    """The bytes one parameter contributes to `weights_fingerprint` (dtype-independent down to bf16)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_PARAM)
    return flat[::step][:SAMPLES_PER_PARAM].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes()


def param_key(name: str, shape) -> bytes:
    return f"{name}:{tuple(shape)};".encode()


def weights_fingerprint(model: nn.Module) -> str:
    """Names, shapes and a strided sample of every parameter (cheap, content-sensitive, dtype-blind)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(param_key(name, p.shape))
        if p.device.type != "meta" and p.is_floating_point():
            h.update(weight_sample(p))
    return h.hexdigest()[:32]


def structure_fingerprint(model: nn.Module) -> str:
    """Names and shapes only: identical for the same model in another dtype or device."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(param_key(name, p.shape))
    return h.hexdigest()[:32]
