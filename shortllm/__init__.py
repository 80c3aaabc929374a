"""shortllm: depth pruning for Hugging Face causal LMs.

Import is cheap and never touches CUDA: public names are resolved lazily.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "score_fast": "shortllm.engine",
    "Scores": "shortllm.scores",
    "load_model": "shortllm.models",
    "calibration_loader": "shortllm.data",
    "get_adapter": "shortllm.arch",
    "Plan": "shortllm.plan",
    "make_plan": "shortllm.plan",
    "prune": "shortllm.prune",
    "export": "shortllm.export",
    "fuse": "shortllm.fuse",
    "load_fused": "shortllm.fuse",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


class _CallableModule(types.ModuleType):
    """A stage module that is also its main function (`shortllm.prune(model, plan)`): importing a submodule
    rebinds the package attribute of the same name to the module, so the module forwards calls."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = _CallableModule


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shortllm' has no attribute {name!r}")
