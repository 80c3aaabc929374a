"""The one version stamp written into every artifact (scores, plans, exports, reports)."""
from __future__ import annotations

import importlib.metadata
import platform


def versions() -> dict[str, str]:
    """Versions of shortllm and of the libraries whose behaviour its numbers depend on."""
    import torch
    import transformers

    try:
        ours = importlib.metadata.version("shortllm")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        ours = "0+unknown"
    return {"shortllm": ours, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
