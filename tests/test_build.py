"""The compiled extensions: built, importable without a GPU, exposing every op; pip builds work."""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPS = ("cosine_stats", "taylor_stats", "lse_update", "nll_finalize")
NO_EXT = os.environ.get("SHORTLLM_NO_EXT") == "1"
HAS_NVCC = shutil.which("nvcc") is not None and os.environ.get("SHORTLLM_NO_CUDA") != "1"


@pytest.mark.skipif(NO_EXT, reason="SHORTLLM_NO_EXT=1 install")
def test_cpu_extension_imports_and_exposes_ops():
    mod = importlib.import_module("shortllm._cpu")
    assert set(OPS) <= set(mod.OPS) and all(callable(getattr(mod, op)) for op in OPS)


@pytest.mark.skipif(NO_EXT or platform.machine() != "x86_64" or shutil.which("nm") is None, reason="x86 + nm")
def test_cpu_extension_dispatches_on_cpu_features():
    so = importlib.import_module("shortllm._cpu").__file__
    syms = subprocess.run(["nm", so], capture_output=True, text=True).stdout
    if not syms:
        pytest.skip("stripped binary")
    # one clone per ISA level, picked by an ifunc resolver at load time (never -march=native)
    assert ".arch_x86_64_v4" in syms and ".arch_x86_64_v3" in syms and ".resolver" in syms


@pytest.mark.skipif(NO_EXT or not HAS_NVCC, reason="nvcc not on PATH: the CUDA extension is not built")
def test_cuda_extension_built_imports_without_gpu_and_exposes_ops():
    # static cudart: importing needs no libcudart and no GPU (ops are not called: no GPU here)
    code = ("import shortllm._cuda as m, sys; ops = set(m.OPS); "
            f"missing = set({OPS!r}) - {{o for o in ops if callable(getattr(m, o, None))}}; "
            "sys.exit(f'missing {missing}' if missing else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, f"shortllm._cuda failed to import: {r.stderr[-2000:]}"
    so = importlib.import_module("shortllm._cuda").__file__
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        assert "libcudart" not in deps, f"cudart must be linked statically:\n{deps}"


def _copy_source(dst: Path) -> Path:
    src = dst / "src"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "*.egg-info")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    for name in ("csrc", "shortllm", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    return src


def _wheel(tmp_path: Path, env_extra: dict[str, str]) -> list[str]:
    src = _copy_source(tmp_path)
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("shortllm-*.whl")
    return zipfile.ZipFile(whl).namelist()


def test_no_ext_gives_pure_python_wheel(tmp_path):
    names = _wheel(tmp_path, {"SHORTLLM_NO_EXT": "1"})
    assert not [n for n in names if n.endswith((".so", ".pyd"))], names
    assert "shortllm/kernels/reductions.py" in names and "shortllm/ops/_cpu_backend.py" in names


@pytest.mark.slow
@pytest.mark.skipif(NO_EXT, reason="SHORTLLM_NO_EXT=1 install")
def test_full_wheel_builds_extensions(tmp_path):
    names = _wheel(tmp_path, {"SHORTLLM_REQUIRE_EXT": "1"})
    assert any(n.startswith("shortllm/_cpu") and n.endswith(".so") for n in names), names
    if HAS_NVCC:
        assert any(n.startswith("shortllm/_cuda") and n.endswith(".so") for n in names), names
