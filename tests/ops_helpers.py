"""Shared by the op tests: the Triton interpreter guard (the `backend` fixture is in conftest.py)."""
import pytest


def need_triton(monkeypatch) -> None:
    pytest.importorskip("triton")
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; export TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

