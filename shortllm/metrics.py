"""Per-block accumulators of the one-pass scorer. Each collector sees every block's (input, output)
through the engine's hooks and keeps only float64 sums: nothing per-token or per-parameter survives
a batch.

A collector implements: `start(engine)`, `begin_batch(ctx)`, `on_block(i, h_in, h_out, ctx)`,
`end_batch(ctx)`, `finish() -> dict[str, Tensor]`, and `accumulators()` (the float64 tensors whose
sum over data shards is the result; used by data-parallel scoring and resumable checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .ops import cosine_stats_, taylor_stats_

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine


@dataclass
class BatchContext:
    index: int
    input_ids: Tensor
    attention_mask: Tensor
    valid: Tensor  # bool [B*T]: token counts iff attention_mask == 1
    last: Tensor  # bool [B*T]: the last valid token of each sequence
    n_valid: int


class Collector:
    metrics: tuple[str, ...] = ()
    needs_grad = False
    needs_logits = False

    def start(self, engine: "Engine") -> None: ...
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
    def close(self) -> None: ...


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
        self.ring: dict[int, Tensor] = {}

    def on_block(self, j: int, h_in: Tensor, h_out: Tensor, ctx: BatchContext) -> None:
        d = h_out.shape[-1]
        x_out = h_out.detach().reshape(-1, d)
        self.ring[j] = h_in.detach().reshape(-1, d)
        span_mask = ctx.last if (self.want_angular and self.tokens == "last") else ctx.valid
        spans = self.n_max if self.want_angular else 1
        for n in range(1, spans + 1):
            start = j + 1 - n
            if start < 0:
                break
            cosine_stats_(self.ring[start], x_out, span_mask, self.acc[n - 1, start])
        if self.separate_bi:
            cosine_stats_(self.ring[j], x_out, ctx.valid, self.bi_acc[j])
        self.ring.pop(j + 1 - spans, None)  # no later span starts there

    def end_batch(self, ctx: BatchContext) -> None:
        self.ring.clear()

    def finish(self) -> dict[str, Tensor]:
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
        return [self.acc] + ([self.bi_acc] if self.separate_bi else [])

    def close(self) -> None:
        self.ring.clear()


def stored_weight(block: torch.nn.Module, name: str, p: Tensor) -> Tensor:
    """The weight's values, also when accelerate offloaded it (device_map "cpu"/"disk": the parameter is on
    the meta device and its hook's `weights_map` holds the values)."""
    if p.device.type != "meta":
        return p.detach()
    owner_name, _, leaf = name.rpartition(".")
    hook = getattr(block.get_submodule(owner_name) if owner_name else block, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        from .errors import UnsupportedModelError
        raise UnsupportedModelError(f"block weight {name} is on the meta device and no accelerate offload hook holds "
                                    "its values; load the model with real weights (or a device_map with offload)")
    return weights[leaf]


class MagCollector(Collector):
    """M_i = sum |W| over the block's weights (no biases). Needs no data."""

    metrics = ("mag",)

    def __init__(self, num_layers: int, device: torch.device):
        self.acc = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)
        self.done = False

    def start(self, engine: "Engine") -> None:
        if not self.done:
            for i, blk in enumerate(engine.adapter.blocks()):
                for name, p in engine.adapter.block_weights(blk):
                    taylor_stats_(stored_weight(blk, name, p).to(self.acc.device), None, self.acc[i])
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

    def __init__(self, num_layers: int, mode: str, device: torch.device, n_batches: Optional[int]):
        if mode not in ("exact", "streaming"):
            from .errors import MetricError
            raise MetricError(f"taylor_mode must be 'exact' or 'streaming', got {mode!r}")
        self.acc = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)
        self.mode = mode
        self.stream = mode == "streaming" or n_batches == 1
        self.params: list[tuple[int, torch.nn.Parameter]] = []
        self.buffers: dict[int, Tensor] = {}
        self.handles = []

    def start(self, engine: "Engine") -> None:
        for i, blk in enumerate(engine.adapter.blocks()):
            for name, p in engine.adapter.block_weights(blk):
                if p.device.type == "meta":  # accelerate swaps in a temporary tensor per forward: no grad lands here
                    from .errors import MetricError
                    raise MetricError(f"taylor needs the gradient of every block weight, but block {i}'s {name} is "
                                      "offloaded by device_map (meta device); load the blocks on a device (no "
                                      "'cpu'/'disk' offload) or use shortllm.offload.score_checkpoint for Taylor")
                self.params.append((i, p))
                self.handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))

    def _make_hook(self, i: int):
        def hook(p: torch.nn.Parameter) -> None:
            if self.stream:
                taylor_stats_(p.detach(), p.grad, self.acc[i])
                p.grad = None
            elif p.dtype.itemsize < 4:  # fp16/bf16 sums in fp32 buffers; fp32/fp64 grads sum in place in p.grad
                buf = self.buffers.get(id(p))
                if buf is None:
                    self.buffers[id(p)] = p.grad.float()
                else:
                    buf.add_(p.grad)
                p.grad = None
        return hook

    def finish(self) -> dict[str, Tensor]:
        if not self.stream:
            for i, p in self.params:
                g = self.buffers.pop(id(p), None)
                g = p.grad if g is None else g
                if g is not None:
                    taylor_stats_(p.detach(), g, self.acc[i])
                p.grad = None
        return {"taylor": self.acc[:, 1].cpu().clone()}

    def accumulators(self) -> list[Tensor]:
        return [self.acc]

    def sync(self, reduce_sum) -> None:
        reduce_sum(self.acc)
        if not self.stream:  # exact mode sums gradients element-wise before the abs: sum them over shards
            for _, p in self.params:
                g = self.buffers.get(id(p))
                if g is None:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    g = p.grad
                reduce_sum(g)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.buffers.clear()
