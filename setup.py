"""Build script. Python package always; C++/CUDA extensions when a toolchain exists.

- `shortllm._cpu`: C++17 + OpenMP via pybind11's setuptools helpers. Kernels bind raw pointers, so no
  torch at build time. Hot loops use target_clones (runtime ISA dispatch), never -march=native.
- `shortllm._cuda`: built when nvcc is found. The .cu files are compiled by nvcc to objects (sm_80 and
  sm_90 SASS plus compute_90 PTX by default), then linked with the host-compiled pybind11 binding and
  a static cudart, so the module imports on machines without a CUDA runtime.

Environment (all optional):
  SHORTLLM_NO_EXT=1        pure-Python install (the PyTorch reference ops are used)
  SHORTLLM_NO_CUDA=1       skip the CUDA extension even when nvcc exists
  SHORTLLM_REQUIRE_EXT=1   fail the install instead of skipping an extension that does not build
  SHORTLLM_NVCC=path       nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)
  SHORTLLM_CUDA_ARCHS=80;90  SM architectures to compile for
  SHORTLLM_BUILD_JOBS=N    parallel compile jobs (default: CPU count)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"shortllm build: {msg}", file=sys.stderr)


def _find_nvcc() -> str | None:
    explicit = os.environ.get("SHORTLLM_NVCC")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_homes(nvcc: str) -> list[Path]:
    # nvcc on PATH may be a wrapper script, so also try the usual install roots
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(os.path.realpath(nvcc)).parent.parent),
             "/usr/local/cuda"]
    return [Path(h) for h in homes if h]


def _cudart_static(homes: list[Path]) -> Path | None:
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            p = home / sub / "libcudart_static.a"
            if p.exists():
                return p
    return None


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _extensions():
    if _flag("SHORTLLM_NO_EXT"):
        _log("SHORTLLM_NO_EXT=1: pure-Python install (reference ops only)")
        return [], {}
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
    except ImportError:
        _log("pybind11 is not installed: skipping the C++ extensions (pip install pybind11, then reinstall)")
        return [], {}

    ParallelCompile("SHORTLLM_BUILD_JOBS", default=os.cpu_count() or 1).install()
    common = dict(cxx_std=17, include_dirs=[CSRC])
    # no FMA contraction: the ISA clones then round identically (results do not depend on the CPU)
    host_flags = ["-O3", "-fvisibility=hidden", "-ffp-contract=off"]
    exts = [
        Pybind11Extension(
            "shortllm._cpu",
            sources=[f"{CSRC}/cpu/kernels.cpp", f"{CSRC}/cpu/gram.cpp", f"{CSRC}/cpu/bindings.cpp"],
            # 512-bit vectors in the x86-64-v4 clone (GCC defaults to 256 there)
            extra_compile_args=host_flags + ["-fopenmp", "-mprefer-vector-width=512", "-Wno-psabi"]
            if _is_x86() else host_flags + ["-fopenmp"],
            extra_link_args=["-fopenmp"],
            **common,
        )
    ]
    nvcc = None if _flag("SHORTLLM_NO_CUDA") else _find_nvcc()
    if nvcc is None:
        _log("nvcc not found (or SHORTLLM_NO_CUDA=1): building without the CUDA extension")
    else:
        homes = _cuda_homes(nvcc)
        cudart = _cudart_static(homes)
        if cudart is None:
            _log(f"no libcudart_static.a under {', '.join(map(str, homes))}: building without the CUDA extension")
        else:
            exts.append(
                Pybind11Extension(
                    "shortllm._cuda",
                    sources=[f"{CSRC}/cuda/bindings.cpp"],
                    extra_compile_args=host_flags,
                    extra_link_args=[str(cudart), "-ldl", "-lpthread", "-lrt"],
                    **common,
                )
            )
            exts[-1].nvcc = nvcc  # type: ignore[attr-defined]
            exts[-1].cu_sources = [f"{CSRC}/cuda/kernels.cu", f"{CSRC}/cuda/gram.cu"]  # type: ignore[attr-defined]

    class ShortllmBuildExt(build_ext):
        """Optional extensions: a failure is reported and skipped unless SHORTLLM_REQUIRE_EXT=1."""

        def build_extension(self, ext):
            try:
                if getattr(ext, "cu_sources", None):
                    self._compile_cuda(ext)
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means "skip this extension"
                if _flag("SHORTLLM_REQUIRE_EXT"):
                    raise
                _log(f"could not build {ext.name} ({exc}); shortllm will fall back to the next backend. "
                     "Set SHORTLLM_REQUIRE_EXT=1 to make this an error.")

        def _compile_cuda(self, ext) -> None:
            archs = [a.strip() for a in os.environ.get("SHORTLLM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                     if a.strip()]
            gencode = []
            for a in archs:
                gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
            out_dir = Path(self.build_temp) / "cuda"
            out_dir.mkdir(parents=True, exist_ok=True)
            objs = []
            for src in ext.cu_sources:
                obj = out_dir / (Path(src).stem + ".o")
                cmd = [ext.nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", f"-I{CSRC}",
                       "-Xcompiler", "-fPIC,-fvisibility=hidden", "--threads", str(min(len(archs) + 1, 4)),
                       *gencode]
                _log(" ".join(cmd))
                subprocess.run(cmd, check=True, cwd=ROOT)
                objs.append(str(obj))
            ext.extra_objects = list(ext.extra_objects or []) + objs

    return exts, {"build_ext": ShortllmBuildExt}


ext_modules, cmdclass = _extensions()

from setuptools import find_packages  # noqa: E402

setup(
    packages=find_packages(include=["shortllm", "shortllm.*"]) + ["shortllm.kernels"],
    package_dir={"shortllm.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
