"""Typed exceptions. Every message says what is wrong and how to fix it.

All errors derive from `ShortLLMError`, so callers (and the CLI, which maps them to exit code 2)
can catch one type. Each subclass also derives from the builtin it refines (ValueError, ...), so
code written against plain Python exceptions keeps working.
"""
from __future__ import annotations


class ShortLLMError(Exception):
    """Base class of every error shortllm raises on purpose."""


class UnsupportedModelError(ShortLLMError, TypeError):
    """The model is not a decoder-only causal LM shortllm knows how to walk."""


class DataError(ShortLLMError, ValueError):
    """Calibration or evaluation data is missing, empty or malformed."""


class EmptyLoaderError(DataError):
    """The loader yielded no batch (or no valid token at all)."""


class SequenceTooLongError(DataError):
    """A batch is longer than the model's maximum position embeddings."""


class MetricError(ShortLLMError, ValueError):
    """Unknown metric name or an invalid metric option."""


class NonFiniteError(ShortLLMError, FloatingPointError):
    """NaN or Inf appeared in a block's output."""


class ScoresMismatchError(ShortLLMError, ValueError):
    """A scores/plan file belongs to a different model (fingerprint or layer count differ)."""


class PlanError(ShortLLMError, ValueError):
    """A pruning request cannot be satisfied (too many blocks, overlapping protection, ...)."""


class ExportError(ShortLLMError, OSError):
    """The output directory exists, is not writable, or the disk is full."""


class ModelLoadError(ShortLLMError, OSError):
    """A model could not be obtained (offline, missing file, bad checkpoint)."""


class CheckpointError(ShortLLMError, ValueError):
    """A resume/offload checkpoint is missing, corrupted or belongs to another run."""


class BackendError(ShortLLMError, RuntimeError):
    """A forced kernel backend (SHORTLLM_BACKEND) is not available for this tensor."""


class DiskSpaceError(ShortLLMError, OSError):
    """Not enough free disk space for files shortllm must write (spilled calibration states, ...)."""


class RetrainConfigError(ShortLLMError, ValueError):
    """A retraining configuration is invalid (unknown method or field, no LoRA target, ...)."""


class UsageError(ShortLLMError, ValueError):
    """Options that contradict each other, or an option that does not apply to the chosen mode."""


class OutputPathError(ShortLLMError, OSError):
    """An output path cannot be written (checked before any work starts)."""
