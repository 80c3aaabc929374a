"""Block replay: capture the exact call every decoder block receives, then re-run any block on another
hidden state with its own call (SPEC §2 "Replaying blocks").

A capture pass runs the model's own base-model forward with every block's `forward` temporarily
replaced: the replacement records (args, kwargs) — masks per attention type, position embeddings,
position ids, the disabled cache — and passes the hidden state through unchanged, so the pass costs
the embeddings, the mask construction and one real block (block 0 runs to learn the output
structure the model expects). Nothing here knows any architecture's forward: re-running block j is
`block.forward(h, *args[1:], **kwargs)` with block j's own captured call.

Replays call `forward` directly, not `__call__`, so hooks registered on the blocks (the scorer's
own input/output hooks) do not fire; hooks on modules inside a block (the branch zeroing below) do.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from shortllm.model.adapters import Adapter
from shortllm.model.hooks import block_input, block_output

BRANCH_KINDS = ("attn", "mlp")


@dataclass
class BlockCall:
    """One block's captured call, with the hidden-state argument removed (so no activation is kept)."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> "BlockCall":
        # A replay runs the block again and again on other hidden states: a live KV cache in the call would
        # take every replay's keys, and the next replay would attend to them. The cache is found by type, not
        # by name: transformers 5.24 renamed the keyword (past_key_values -> cache), GPT-2 passes it
        # positionally and GPT-NeoX as layer_past.
        args = tuple(_drop_cache(a) for a in args)
        kwargs = {k: _drop_cache(v) for k, v in kwargs.items()}
        if args:
            return cls((None,) + tuple(args[1:]), kwargs, False)
        if "hidden_states" not in kwargs:
            raise RuntimeError("decoder block called without a hidden-state argument (positional or "
                               "'hidden_states='); pass an adapter whose 'blocks' path names the decoder layers")
        kwargs["hidden_states"] = None
        return cls((), kwargs, True)

    def run(self, block: nn.Module, h: Tensor) -> Tensor:
        """The block's output hidden state on input `h` (the first element when it returns a tuple)."""
        if self.hidden_in_kwargs:
            kw = dict(self.kwargs)
            kw["hidden_states"] = h
            return block_output(block.forward(*self.args, **kw))
        return block_output(block.forward(h, *self.args[1:], **self.kwargs))


def _drop_cache(value):
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


class _StopCapture(Exception):
    """Raised by the last block's capture stub: nothing after the blocks is needed."""


@contextlib.contextmanager
def _patched_forwards(blocks: Sequence[nn.Module], make: Callable[[int, Callable], Callable]) -> Iterator[None]:
    """Replace each block's `forward` (instance attribute), restoring any instance-level patch already there
    (the engine's activation checkpointing wrapper) on exit."""
    saved = []
    try:
        for i, blk in enumerate(blocks):
            had = "forward" in blk.__dict__
            saved.append((blk, had, blk.__dict__.get("forward")))
            blk.forward = make(i, blk.forward)
        yield
    finally:
        for blk, had, fwd in saved:
            if had:
                blk.forward = fwd
            else:
                del blk.forward


def _like(out0, h: Tensor):
    """`h` in the output structure block 0 returned (tensor, or tuple with extras)."""
    if isinstance(out0, tuple):
        return (h,) + tuple(out0[1:])
    if isinstance(out0, list):
        return [h] + list(out0[1:])
    return h


def capture_calls(model: nn.Module, adapter: Adapter, input_ids: Tensor,
                  attention_mask: Optional[Tensor]) -> tuple[Tensor, list[BlockCall]]:
    """(h_0, calls): the first block's input and every block's captured call for this batch.

    Runs `model.base_model(input_ids, attention_mask, use_cache=False)` — the call the scorer makes —
    with capture stubs in place of the block forwards.
    """
    blocks = adapter.blocks()
    L = len(blocks)
    calls: list[Optional[BlockCall]] = [None] * L
    state: dict = {}

    def make(i: int, orig: Callable) -> Callable:
        def stub(*args, **kwargs):
            calls[i] = BlockCall.from_call(args, kwargs)
            if i == 0:
                state["h0"] = block_input(args, kwargs)
            if i == L - 1:
                raise _StopCapture
            if i == 0:
                state["out0"] = orig(*args, **kwargs)
                return state["out0"]
            return _like(state["out0"], block_input(args, kwargs))
        return stub

    with torch.no_grad(), _patched_forwards(blocks, make):
        try:
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopCapture:
            pass
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"blocks {missing} were never called by the model's forward; the adapter's block list "
                           f"({adapter.spec.blocks}) does not match what the model runs (is config."
                           f"{adapter.spec.num_layers_key} smaller than the layer list?)")
    return state["h0"], calls  # type: ignore[return-value]


def run_blocks(blocks: Sequence[nn.Module], calls: Sequence[BlockCall], h: Tensor, indices: Iterable[int]) -> Tensor:
    """Run blocks `indices` in order on `h`, each with its own captured call."""
    for j in indices:
        h = calls[j].run(blocks[j], h)
    return h


def _zero_output(_module: nn.Module, _args, out):
    if isinstance(out, Tensor):
        return torch.zeros_like(out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        first = torch.zeros_like(out[0])
        return (first,) + tuple(out[1:]) if isinstance(out, tuple) else [first] + list(out[1:])
    raise RuntimeError(f"cannot zero the output of {type(_module).__name__}: it returned {type(out).__name__}, "
                       "expected a tensor or a tuple whose first element is the branch output")


def check_branches(adapter: Adapter, branches: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    L = adapter.num_layers
    out = []
    for kind, i in branches:
        if kind not in BRANCH_KINDS:
            raise ValueError(f"branch kind must be one of {BRANCH_KINDS}, got {kind!r}")
        if not 0 <= int(i) < L:
            raise IndexError(f"block index {i} out of range for a model of {L} blocks")
        out.append((kind, int(i)))
    return out


@contextlib.contextmanager
def zeroed_branches(adapter: Adapter, branches: Iterable[tuple[str, int]]) -> Iterator[None]:
    """While active, each (kind, block) branch ("attn" or "mlp") contributes zero to the residual stream.

    A forward hook replaces the branch module's output with zeros (the first element of a tuple
    output). Post-norm models (Gemma-2/3: norm(branch) with RMSNorm(0) = 0) and parallel-residual
    models (GPT-NeoX) alike then add nothing from that branch. Post-layer-norm blocks (OPT with
    do_layer_norm_before=False: h -> LayerNorm(h + branch(h))) are refused with UnsupportedModelError:
    there the zeroed branch still normalises the stream, so it is not removed.
    """
    branches = check_branches(adapter, branches)
    if branches:
        adapter.refuse_branch_removal()  # a score for a removal prune would refuse to apply
    blocks = adapter.blocks()
    handles = []
    try:
        for kind, i in branches:
            mod = adapter.branch(blocks[i], kind)
            if mod is None:
                raise RuntimeError(f"block {i} has no {kind} module at '{getattr(adapter.spec, kind)}'")
            handles.append(mod.register_forward_hook(_zero_output))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def layers_removed(model: nn.Module, adapter: Adapter, drop: Iterable[int]) -> Iterator[nn.Module]:
    """Temporarily run `model` as if blocks `drop` were physically deleted: the layer list holds only the
    kept blocks and the per-layer config (`num_hidden_layers`, `layer_types`) is rewritten so every kept
    block keeps its own attention type. The naive baseline of the PPL criterion (one full forward per
    candidate); restored on exit."""
    drop = set(int(i) for i in drop)
    parent_path, _, name = adapter.spec.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old_list = getattr(parent, name)
    keep = [i for i in range(len(old_list)) if i not in drop]
    cfg = model.config
    key = adapter.spec.num_layers_key
    old_cfg = {key: getattr(cfg, key)}
    for k in adapter.spec.per_layer_config:
        if getattr(cfg, k, None) is not None:
            old_cfg[k] = getattr(cfg, k)
    try:
        setattr(parent, name, nn.ModuleList([old_list[i] for i in keep]))
        setattr(cfg, key, len(keep))
        for k, v in old_cfg.items():
            if k != key:
                setattr(cfg, k, [v[i] for i in keep])
        yield model
    finally:
        setattr(parent, name, old_list)
        for k, v in old_cfg.items():
            setattr(cfg, k, v)
