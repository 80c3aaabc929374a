"""Per-block accumulators of the one-pass scorer. Each collector sees every block's (input, output)
through the engine's hooks and keeps only float64 sums: nothing per-token or per-parameter survives
a batch.

A collector implements: `start(run)`, `begin_batch(ctx)`, `on_block(i, h_in, h_out, ctx)`,
`end_batch(ctx)`, `finish() -> dict[str, Tensor]`, `accumulators()` (the float64 tensors whose sum
over data shards is the result; data-parallel scoring all-reduces them) and `state_dict()` /
`load_state_dict()` (everything a resumed run needs; resumable checkpoints save only that).
`run` is a `RunContext` and `ctx` a `BatchContext` (`shortllm.scoring.context`): a collector never
sees the engine that drives it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from shortllm.errors import CheckpointError, MetricError, UnsupportedModelError
from shortllm.ops import cosine_span_stats_, cosine_stats_, taylor_stats_
from shortllm.scoring.context import BatchContext, RunContext


class Collector:
    metrics: tuple[str, ...] = ()
    needs_grad = False  # the engine runs a backward pass per batch
    needs_weight_grad = False  # ... in which block weights need their gradients (else they stay frozen)

    def start(self, run: RunContext) -> None: ...
    def begin_batch(self, ctx: BatchContext) -> None: ...
    def on_block(self, i: int, h_in: Tensor, h_out: Tensor, ctx: BatchContext) -> None: ...
    def end_batch(self, ctx: BatchContext) -> None: ...
    def after_backward(self, ctx: BatchContext) -> None: ...
    def finish(self) -> dict[str, Tensor]:
        raise NotImplementedError
    def accumulators(self) -> list[Tensor]:
        return []
    def sync(self, reduce_sum) -> None:
        """Sum this collector's state over data shards (data-parallel scoring); before `finish`."""
        for t in self.accumulators():
            reduce_sum(t)
    def state_dict(self) -> dict[str, Tensor]:
        """The live tensors a resumed run must get back (after `start`); saved by resumable checkpoints."""
        return {f"acc{j}": t for j, t in enumerate(self.accumulators())}
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        live = self.state_dict()
        if set(state) != set(live):
            raise CheckpointError(f"{type(self).__name__}: saved state holds {sorted(state)} but this run needs "
                                  f"{sorted(live)}")
        for k, t in state.items():
            _copy_checked(live[k], t, f"{type(self).__name__}.{k}")
    def close(self) -> None: ...


class DeviceSums:
    """A float64 accumulator that blocks on several devices (a model spread with `device_map`) add into
    without a host sync: each device adds into its own zeroed copy, folded into `main` by `merge()`
    once per batch. A kernel must never be handed an accumulator on another device than its inputs:
    the CUDA/Triton ops would copy their 3 sums across per call (a sync per block when it is the CPU)."""

    def __init__(self, main: Tensor):
        self.main = main
        self.copies: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        if device == self.main.device:
            return self.main
        t = self.copies.get(device)
        if t is None:
            t = self.copies[device] = torch.zeros(self.main.shape, dtype=self.main.dtype, device=device)
        return t

    def merge(self) -> Tensor:
        for t in self.copies.values():
            self.main.add_(t.to(self.main.device))
            t.zero_()
        return self.main


def _copy_checked(live: Tensor, saved: Tensor, name: str) -> None:
    if saved.shape != live.shape or saved.dtype != live.dtype:
        raise CheckpointError(f"saved {name} has shape {tuple(saved.shape)} {saved.dtype}, expected "
                              f"{tuple(live.shape)} {live.dtype}")
    live.copy_(saved.to(live.device))


class CosineCollector(Collector):
    """BI (ShortGPT) and angular distance of spans n = 1..n_max (Gromov et al.) from one ring of inputs.

    h_l is the input of block l and h_{l+n} the output of block l+n-1, so at block j's output every
    span ending there is scored against the ring of the last n_max block inputs; span n = 1 is BI.
    """

    def __init__(self, num_layers: int, n_max: int, angular_tokens: str, want_bi: bool, want_angular: bool,
                 device: torch.device):
        self.L, self.n_max, self.tokens = num_layers, n_max, angular_tokens
        self.want_bi, self.want_angular = want_bi, want_angular
        self.metrics = tuple(m for m, w in (("bi", want_bi), ("angular", want_angular)) if w)
        self.acc = torch.zeros(n_max if want_angular else 1, num_layers, 3, dtype=torch.float64, device=device)
        # BI always counts every valid token; it shares span 1 with angular unless angular uses last tokens
        self.separate_bi = want_bi and want_angular and angular_tokens == "last"
        self.bi_acc = torch.zeros(num_layers, 3, dtype=torch.float64, device=device) if self.separate_bi else None
        self.sums = DeviceSums(self.acc)
        self.bi_sums = DeviceSums(self.bi_acc) if self.separate_bi else None
        self.ring: dict[int, Tensor] = {}
        # the batch's masks, copied once per device (not once per block and span); cleared every batch
        self._masks: dict[tuple[int, torch.device], Tensor] = {}

    def _mask_on(self, mask: Tensor, device: torch.device) -> Tensor:
        if mask.device == device:
            return mask
        key = (id(mask), device)
        if key not in self._masks:
            self._masks[key] = mask.to(device)
        return self._masks[key]

    def _ring_on(self, k: int, device: torch.device) -> Tensor:
        # With device_map, h_in of a block is still on the previous block's device (accelerate moves it
        # inside the block's forward, after the scorer's pre-hook saw it), while h_out is on this block's.
        # The moved copy replaces the ring entry so later spans on this device reuse it.
        t = self.ring[k]
        if t.device != device:
            t = self.ring[k] = t.to(device)
        return t

    def on_block(self, j: int, h_in: Tensor, h_out: Tensor, ctx: BatchContext) -> None:
        d = h_out.shape[-1]
        x_out = h_out.detach().reshape(-1, d)
        dev = x_out.device
        self.ring[j] = h_in.detach().reshape(-1, d)
        span_mask = self._mask_on(ctx.last if (self.want_angular and self.tokens == "last") else ctx.valid, dev)
        acc = self.sums.on(dev)
        spans = self.n_max if self.want_angular else 1
        # every span ending here in one fused call (x_out is read once): span n = i + 1 starts at j - i and
        # adds into acc[i, j - i], so the k rows it fills are one anti-diagonal of acc, a strided [k, 3] view
        k = min(spans, j + 1)
        s0, s1, s2 = acc.stride()
        diag = acc.as_strided((k, 3), (s0 - s1, s2), acc.storage_offset() + j * s1)
        cosine_span_stats_([self._ring_on(j - i, dev) for i in range(k)], x_out, span_mask, diag)
        if self.separate_bi:
            cosine_stats_(self._ring_on(j, dev), x_out, self._mask_on(ctx.valid, dev), self.bi_sums.on(dev)[j])
        self.ring.pop(j + 1 - spans, None)  # no later span starts there

    def _merge(self) -> None:
        self.sums.merge()
        if self.bi_sums is not None:
            self.bi_sums.merge()

    def end_batch(self, ctx: BatchContext) -> None:
        self.ring.clear()
        self._masks.clear()
        self._merge()

    def finish(self) -> dict[str, Tensor]:
        self._merge()
        out = {}
        acc = self.acc.cpu()
        if self.want_bi:
            bi = self.bi_acc.cpu() if self.separate_bi else acc[0]
            out["bi"] = 1.0 - bi[:, 0] / bi[:, 2]
        if self.want_angular:
            ang = acc[:, :, 1] / acc[:, :, 2]
            n = torch.arange(1, self.n_max + 1)[:, None]
            start = torch.arange(self.L)[None, :]
            out["angular"] = torch.where(start + n > self.L, torch.full_like(ang, float("nan")), ang)
        return out

    def accumulators(self) -> list[Tensor]:
        self._merge()
        return [self.acc] + ([self.bi_acc] if self.separate_bi else [])

    def close(self) -> None:
        self.ring.clear()
        self._masks.clear()


def stored_weight(block: torch.nn.Module, name: str, p: Tensor) -> Tensor:
    """The weight's values, also when accelerate offloaded it (device_map "cpu"/"disk": the parameter is on
    the meta device and its hook's `weights_map` holds the values)."""
    if p.device.type != "meta":
        return p.detach()
    owner_name, _, leaf = name.rpartition(".")
    hook = getattr(block.get_submodule(owner_name) if owner_name else block, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise UnsupportedModelError(f"block weight {name} is on the meta device and no accelerate offload hook holds "
                                    "its values; load the model with real weights (or a device_map with offload)")
    return weights[leaf]


class MagCollector(Collector):
    """M_i = sum |W| over the block's weights (no biases). Needs no data."""

    metrics = ("mag",)

    def __init__(self, num_layers: int, device: torch.device):
        self.acc = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)
        self.done = False

    def start(self, run: RunContext) -> None:
        if not self.done:
            sums = DeviceSums(self.acc)
            for i, blk in enumerate(run.adapter.blocks()):
                for name, p in run.adapter.block_weights(blk):
                    # reduced where the values are (a block on the CPU, an offloaded weight's CPU copy),
                    # not copied whole to the accumulator's device first
                    w = stored_weight(blk, name, p)
                    taylor_stats_(w, None, sums.on(w.device)[i])
            sums.merge()
            self.done = True

    def finish(self) -> dict[str, Tensor]:
        return {"mag": self.acc[:, 2].cpu().clone()}

    def accumulators(self) -> list[Tensor]:
        return []  # data-independent: identical on every rank, never summed


class TaylorCollector(Collector):
    """T_i = sum over the block's weights of |sum_b W * dL_b/dW| (seed-000), reduced as gradients arrive.

    mode "exact": the signed W*G is accumulated over batches before the abs (gradients summed per
    element; fp32 buffers for low-precision weights). With one batch this is the streaming reduction.
    mode "streaming": sum_b sum |W * dL_b/dW|: each gradient is reduced and freed the moment it is
    ready, so no gradient outlives its parameter's backward step (differs from exact when batches > 1).
    """

    metrics = ("taylor",)
    needs_grad = True
    needs_weight_grad = True

    def __init__(self, num_layers: int, mode: str, device: torch.device, n_batches: Optional[int]):
        if mode not in ("exact", "streaming"):
            raise MetricError(f"taylor_mode must be 'exact' or 'streaming', got {mode!r}")
        self.acc = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)
        self.sums = DeviceSums(self.acc)  # each gradient is reduced on its weight's device
        self.mode = mode
        self.stream = mode == "streaming" or n_batches == 1
        self.params: list[tuple[int, torch.nn.Parameter]] = []
        self.buffers: dict[int, Tensor] = {}
        self.handles = []

    def start(self, run: RunContext) -> None:
        for i, blk in enumerate(run.adapter.blocks()):
            for name, p in run.adapter.block_weights(blk):
                if p.device.type == "meta":  # accelerate swaps in a temporary tensor per forward: no grad lands here
                    raise MetricError(f"taylor needs the gradient of every block weight, but block {i}'s {name} is "
                                      "offloaded by device_map (meta device); load the blocks on a device (no "
                                      "'cpu'/'disk' offload) or use shortllm.score_checkpoint for Taylor")
                self.params.append((i, p))
                self.handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))

    def _make_hook(self, i: int):
        def hook(p: torch.nn.Parameter) -> None:
            if self.stream:
                taylor_stats_(p.detach(), p.grad, self.sums.on(p.device)[i])
                p.grad = None
            elif p.dtype.itemsize < 4:  # fp16/bf16 sums in fp32 buffers; fp32/fp64 grads sum in place in p.grad
                buf = self.buffers.get(id(p))
                if buf is None:
                    self.buffers[id(p)] = p.grad.float()
                else:
                    buf.add_(p.grad)
                p.grad = None
        return hook

    def end_batch(self, ctx: BatchContext) -> None:
        self.sums.merge()

    def finish(self) -> dict[str, Tensor]:
        if not self.stream:
            for i, p in self.params:
                g = self.buffers.pop(id(p), None)
                g = p.grad if g is None else g
                if g is not None:
                    taylor_stats_(p.detach(), g, self.sums.on(p.device)[i])
                p.grad = None
        self.sums.merge()
        return {"taylor": self.acc[:, 1].cpu().clone()}

    def accumulators(self) -> list[Tensor]:
        return [self.sums.merge()]

    def sync(self, reduce_sum) -> None:
        reduce_sum(self.sums.merge())
        if not self.stream:  # exact mode sums gradients element-wise before the abs: sum them over shards
            for _, p in self.params:
                g = self.buffers.get(id(p))
                if g is None:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    g = p.grad
                reduce_sum(g)

    def state_dict(self) -> dict[str, Tensor]:
        """The per-block sums, and in exact mode the signed gradient sums accumulated so far (p.grad for
        fp32/fp64 weights, fp32 buffers for fp16/bf16 ones)."""
        out = {"acc": self.sums.merge()}
        if not self.stream:
            for idx, (_, p) in enumerate(self.params):
                g = self.buffers.get(id(p), p.grad)
                if g is not None:
                    out[f"grad.{idx}"] = g
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        unknown = sorted(k for k in state if k != "acc" and not (k.startswith("grad.") and not self.stream
                                                                 and k[5:].isdigit() and int(k[5:]) < len(self.params)))
        if "acc" not in state or unknown:
            raise CheckpointError(f"TaylorCollector: saved state holds {sorted(state)}; expected 'acc' and, in exact "
                                  f"mode, grad.0..grad.{len(self.params) - 1}")
        _copy_checked(self.acc, state["acc"], "TaylorCollector.acc")
        for k, g in state.items():
            if k == "acc":
                continue
            _, p = self.params[int(k[5:])]
            if g.shape != p.shape:
                raise CheckpointError(f"a saved Taylor gradient sum has shape {tuple(g.shape)} but its weight has "
                                      f"{tuple(p.shape)}; the checkpoint is of another model")
            if p.dtype.itemsize >= 4:
                p.grad = g.to(device=p.device, dtype=p.dtype)
            else:
                self.buffers[id(p)] = g.to(device=p.device, dtype=torch.float32)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.buffers.clear()
