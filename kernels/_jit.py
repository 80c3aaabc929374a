"""Lazy `triton.jit`: triton decides interpreter vs compiler when a function is decorated, so kernels
are decorated on first use and cached per mode — a process can run interpreted CPU tests and
compiled GPU kernels, and importing this package never imports triton."""
from __future__ import annotations

from typing import Callable

_cache: dict[tuple[Callable, bool], Callable] = {}


def interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def jit(fn: Callable) -> Callable:
    import triton

    key = (fn, interpreting())
    if key not in _cache:
        _cache[key] = triton.jit(fn)
    return _cache[key]
