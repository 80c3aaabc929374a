import os

# Triton fixes interpreter mode when it is first imported: set it before anything can import triton,
# so the Triton kernels run (on CPU tensors) in every test session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# CI sets SHORTLLM_DATA=../shared/data; default to the same sibling folder for local runs.
if "SHORTLLM_DATA" not in os.environ:
    guess = HERE.parent.parent / "shared" / "data"
    if guess.is_dir():
        os.environ["SHORTLLM_DATA"] = str(guess)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the built-in SmolLM2-135M, fp32 on CPU (cached after the first conversion)."""
    from shortllm.model.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("SHORTLLM_DATA")
    if not d or not Path(d).is_dir():
        pytest.skip("SHORTLLM_DATA is not set to the shared data folder")
    return Path(d)


@pytest.fixture(params=["ref", "cpu", "triton"])
def backend(request, monkeypatch):
    """Every kernel backend in turn, forced through SHORTLLM_BACKEND (the op tests compare each to `_ref`)."""
    from ops_helpers import need_triton

    from shortllm.ops import _backend

    name = request.param
    if name == "cpu" and not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    if name == "triton":
        need_triton(monkeypatch)
    monkeypatch.setenv("SHORTLLM_BACKEND", name)
    return name
