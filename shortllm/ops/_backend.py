"""Backend selection for the fused ops.

Order (SPEC §5): CUDA tensor -> Triton (or the `_cuda` extension); CPU tensor -> the `_cpu`
extension; otherwise -> the PyTorch reference. `SHORTLLM_BACKEND=ref|cpu|triton|cuda` forces one.

Each non-reference backend is a module `shortllm.ops._<name>_backend` exposing `IMPLS`, a dict
op-name -> callable with the same signature as the op's reference implementation. Backends are
imported lazily on first use so `import shortllm` never touches CUDA or compiles anything. A backend
that fails to import is skipped; the first time it would have run (or SHORTLLM_BACKEND asks for it)
a `BackendUnavailableWarning` names it, the import error and the fix — once per backend per process.
A backend that does not apply (the CUDA backend for CPU tensors) is never imported, so never warns.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Callable, ContextManager

import torch

from ..errors import BackendError

BACKENDS = ("ref", "cpu", "triton", "cuda")
_REF: dict[str, Callable] = {}
_loaded: dict[str, dict[str, Callable] | None] = {}
_import_errors: dict[str, str] = {}
_warned: set[str] = set()
_warn_lock = threading.Lock()

_FIX = {
    "cpu": "reinstall with a C++ compiler available (`pip install .`), or set SHORTLLM_BACKEND=ref",
    "cuda": "reinstall on a machine with nvcc on PATH (`pip install .`)",
    "triton": "`pip install triton` (needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU testing)",
}


class BackendUnavailableWarning(UserWarning):
    """A kernel backend that would have run, or that SHORTLLM_BACKEND forces, failed to import."""


def register_ref(op: str, fn: Callable) -> None:
    _REF[op] = fn


def _load(name: str) -> dict[str, Callable] | None:
    # silent: available_backends() probes every backend, and a probe is not a use (see _warn_unavailable)
    if name not in _loaded:
        try:
            mod = importlib.import_module(f"shortllm.ops._{name}_backend")
            _loaded[name] = dict(mod.IMPLS)
        except Exception as exc:  # an optional backend must never break import, whatever it raises
            _loaded[name] = None
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def _warn_unavailable(name: str, forced: bool) -> None:
    with _warn_lock:
        if name in _warned:
            return
        _warned.add(name)
    then = ("SHORTLLM_BACKEND forces it, so the op raises BackendError" if forced
            else "the next backend (ultimately the PyTorch reference) runs instead")
    warnings.warn(
        f"shortllm: the '{name}' kernel backend failed to import ({_import_errors.get(name, 'unknown error')}); "
        f"{then}. Fix: {_FIX[name]}.",
        BackendUnavailableWarning,
        stacklevel=3,  # the op that asked select() for the backend
    )


def import_error(name: str) -> str | None:
    """Why backend `name` failed to import (None if it imported or was never tried)."""
    return _import_errors.get(name)


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
        if impls is None:
            _warn_unavailable(name, forced is not None)
        elif op in impls:
            supports = impls.get(f"{op}:supports")
            if supports is None or supports(device):
                return name, impls[op]
        if forced is not None:
            why = f" (import failed: {_import_errors[name]})" if impls is None else ""
            raise BackendError(
                f"SHORTLLM_BACKEND={forced} but that backend cannot run '{op}' on {device}{why}; "
                f"fix: {_FIX.get(forced, 'unset SHORTLLM_BACKEND')}."
            )
    return "ref", _REF[op]


def device_guard(device: torch.device) -> ContextManager:
    """Make `device` current around a kernel launch. Triton and the CUDA extension launch on the current
    device's stream, which need not be the one holding the inputs (multi-GPU, device_map="auto")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def kernel_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y with unit stride along their last dim (what the raw-pointer kernels index); a width-1 row is
    read as one element, so any stride serves it and nothing is copied."""
    return tuple(t.contiguous() if t.stride(-1) != 1 and t.shape[-1] > 1 else t for t in (x, y))


def kernel_mask(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The row mask as a flat contiguous bool tensor on `device` (kernels read it by raw pointer next to x)."""
    return None if mask is None else mask.reshape(-1).to(device=device, dtype=torch.bool).contiguous()


def available_backends() -> dict[str, bool]:
    """Which backends import on this machine (does not initialise CUDA; never warns)."""
    return {"ref": True, **{b: _load(b) is not None for b in BACKENDS if b != "ref"}}
