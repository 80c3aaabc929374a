"""What a collector is given: the run (model, adapter, device) and each batch (ids, mask, valid tokens).

Collectors see only these two narrow records, never the engine that drives them, so the engine, the
out-of-core scorer and resumable checkpoints can all drive the same collectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from shortllm.errors import DataError, EmptyLoaderError, SequenceTooLongError


@dataclass(frozen=True)
class RunContext:
    model: nn.Module
    adapter: Any  # shortllm.model.adapters.Adapter
    device: torch.device
    progress: bool = False


@dataclass
class BatchContext:
    index: int
    input_ids: Tensor
    attention_mask: Tensor
    valid: Tensor  # bool [B*T]: token counts iff attention_mask == 1
    last: Tensor  # bool [B*T]: the last valid token of each sequence
    n_valid: int


def batch_context(index: int, batch: dict, model: nn.Module, device: torch.device) -> BatchContext:
    """Validate one calibration batch and move it to `device` (typed errors name the fix)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if ids.is_floating_point() or ids.is_complex():
        raise DataError(f"batch {index}: input_ids must be an integer tensor of token ids, got {ids.dtype}; "
                        "pass the tokenizer's ids (torch.long), e.g. from shortllm.data.calibration.calibration_loader")
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise EmptyLoaderError(f"batch {index}: input_ids must be [B, T] with a matching attention_mask; got "
                               f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos is not None and ids.shape[1] > max_pos:
        raise SequenceTooLongError(f"batch {index} has sequences of {ids.shape[1]} tokens but the model supports "
                                   f"{max_pos} positions; use a shorter seq_len (e.g. --seq-len {min(max_pos, 2048)})")
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    m = mask != 0
    valid = m.reshape(-1)
    # the one host sync per batch: the token count (needed for the token-weighted means and the error below)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise EmptyLoaderError(f"batch {index} has no valid token (attention_mask is all 0); drop empty texts "
                               "from the calibration data")
    # last valid position of each row (right or left padding alike); rows without one mark nothing
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last_idx = torch.where(m, pos, -1).max(dim=1, keepdim=True).values
    last = (pos == last_idx) & m
    return BatchContext(index=index, input_ids=ids, attention_mask=mask, valid=valid, last=last.reshape(-1),
                        n_valid=n_valid)


def next_token_targets(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """[B, T-1] targets of the next-token loss, -100 where a prediction does not count: a prediction counts
    iff both the token it is made from and the token it predicts are valid. With right padding this is Hugging
    Face's `labels` with -100 on padding; with left padding it also drops the prediction made from the last
    pad position (a padded row's hidden state is not a token's: it may even be NaN)."""
    targets = input_ids[:, 1:]
    if attention_mask is None:
        return targets
    both = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    return targets.masked_fill(~both, -100)
