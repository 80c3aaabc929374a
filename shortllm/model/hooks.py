"""Forward hooks that hand every decoder block's (input, output) to the scorer while the model runs.

The input of block i is the residual stream h_i (first positional argument, or the `hidden_states`
keyword); its output h_{i+1} is the block's raw return value (first element when it returns a tuple),
never the final-normed state.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("decoder block called without a hidden-state argument; pass an adapter for this model")


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def block_io_hooks(blocks: Sequence[nn.Module],
                   on_block: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call `on_block(i, h_in, h_out)` after each block's forward; hooks removed on exit, even on error."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre(i, _module, args, kwargs):
        inputs[i] = block_input(args, kwargs)

    def post(i, _module, _args, _kwargs, out):
        on_block(i, inputs.pop(i), block_output(out))

    try:
        for i, blk in enumerate(blocks):
            handles.append(blk.register_forward_pre_hook(functools.partial(pre, i), with_kwargs=True))
            handles.append(blk.register_forward_hook(functools.partial(post, i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        inputs.clear()


@contextlib.contextmanager
def checkpointed_blocks(blocks: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Per-block activation recomputation for backward, independent of the model's train/eval mode.

    The recomputation calls the block's original `forward` directly, not `__call__`, so the scorer's
    hooks fire once per real forward and never again during backward.
    """
    if not enabled:
        yield
        return
    patched = []
    try:
        for blk in blocks:
            orig = blk.forward

            def ckpt_forward(*args, __orig=orig, **kwargs):
                if not torch.is_grad_enabled():
                    return __orig(*args, **kwargs)
                return checkpoint(__orig, *args, use_reentrant=False, **kwargs)

            blk.forward = ckpt_forward
            patched.append(blk)
        yield
    finally:
        for blk in patched:
            del blk.forward  # drop the instance attribute: the class method is visible again
