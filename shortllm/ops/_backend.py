"""Backend selection for the fused ops.

Order (SPEC §5): CUDA tensor -> Triton (or the `_cuda` extension); CPU tensor -> the `_cpu`
extension; otherwise -> the PyTorch reference. `SHORTLLM_BACKEND=ref|cpu|triton|cuda` forces one.

Each non-reference backend is a module `shortllm.ops._<name>_backend` exposing `IMPLS`, a dict
op-name -> callable with the same signature as the op's reference implementation. Backends are
imported lazily on first use so `import shortllm` never touches CUDA or compiles anything; a backend
that fails to import warns once (naming the fix) and is skipped.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch

from ..errors import BackendError

BACKENDS = ("ref", "cpu", "triton", "cuda")
_REF: dict[str, Callable] = {}
_loaded: dict[str, dict[str, Callable] | None] = {}

_FIX = {
    "cpu": "reinstall with a C++ compiler available (`pip install .`), or set SHORTLLM_BACKEND=ref",
    "cuda": "reinstall on a machine with nvcc on PATH (`pip install .`)",
    "triton": "`pip install triton` (needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU testing)",
}


def register_ref(op: str, fn: Callable) -> None:
    _REF[op] = fn


def _load(name: str) -> dict[str, Callable] | None:
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"shortllm.ops._{name}_backend")
            _loaded[name] = dict(mod.IMPLS)
        except Exception as exc:  # an optional backend must never break import
            _loaded[name] = None
            if os.environ.get("SHORTLLM_BACKEND") == name or name == "cpu":
                warnings.warn(
                    f"shortllm: the '{name}' kernel backend is unavailable ({exc}); "
                    f"falling back to the PyTorch reference. Fix: {_FIX[name]}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _loaded[name]


def forced_backend() -> str | None:
    name = os.environ.get("SHORTLLM_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise BackendError(
            f"SHORTLLM_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it."
        )
    return name


def _candidates(device: torch.device) -> tuple[str, ...]:
    forced = forced_backend()
    if forced is not None:
        return (forced,)
    if device.type == "cuda":
        return ("triton", "cuda", "ref")
    if device.type == "cpu":
        return ("cpu", "ref")
    return ("ref",)


def select(op: str, device: torch.device) -> tuple[str, Callable]:
    """Return (backend name, implementation) for `op` on `device`."""
    forced = forced_backend()
    for name in _candidates(device):
        if name == "ref":
            return "ref", _REF[op]
        impls = _load(name)
        if impls is not None and op in impls:
            supports = impls.get(f"{op}:supports")
            if supports is None or supports(device):
                return name, impls[op]
        if forced is not None:
            raise BackendError(
                f"SHORTLLM_BACKEND={forced} but that backend cannot run '{op}' on {device}; "
                f"fix: {_FIX.get(forced, 'unset SHORTLLM_BACKEND')}."
            )
    return "ref", _REF[op]


def available_backends() -> dict[str, bool]:
    """Which backends import on this machine (does not initialise CUDA)."""
    return {"ref": True, **{b: _load(b) is not None for b in BACKENDS if b != "ref"}}
