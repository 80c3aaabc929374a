"""shortllm: depth pruning for Hugging Face causal LMs.

Import is cheap and never touches CUDA: public names are resolved lazily from the stage subpackages
(`shortllm.model`, `.data`, `.scoring`, `.pruning`, `.evaluation`, `.retrain`).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (no name here is also a module of this package)
_EXPORTS = {
    "load_model": "shortllm.model.loading",
    "get_adapter": "shortllm.model.adapters",
    "calibration_loader": "shortllm.data.calibration",
    "score_fast": "shortllm.scoring.engine",
    "score_checkpoint": "shortllm.scoring.offload",
    "Scores": "shortllm.scoring.scores",
    "Plan": "shortllm.pruning.plans",
    "make_plan": "shortllm.pruning.plans",
    "prune": "shortllm.pruning.removal",
    "export": "shortllm.pruning.exporting",
    "fuse": "shortllm.pruning.fusion",
    "load_fused": "shortllm.pruning.fusion",
    "perplexity": "shortllm.evaluation.corpus_ppl",
    "heal": "shortllm.pruning.healing",
    "Budget": "shortllm.pruning.budget",
    "harness_eval": "shortllm.evaluation.harness",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shortllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
