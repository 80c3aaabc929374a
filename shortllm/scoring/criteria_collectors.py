"""Collectors of the newer criteria, driven by the same engine hooks as those in `collectors`:
sub-layer influence (`bi_attn`, `bi_mlp`), gate-gradient importance (`gate`) and the reverse-order
baseline (`tail`). Same contract as `shortllm.scoring.collectors.Collector`: float64 sums only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from shortllm.errors import MetricError
from shortllm.ops import cosine_stats_, taylor_stats_
from shortllm.scoring.collectors import Collector, DeviceSums
from shortllm.scoring.context import BatchContext, RunContext


def parallel_residual(config) -> bool:
    """Whether a block adds both branches to its INPUT (h + attn(h) + mlp(h): GPT-NeoX's
    `use_parallel_residual`, Falcon's `parallel_attn`) rather than running the MLP on h + attn(h)."""
    return bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))


class SubLayerCollector(Collector):
    """bi_attn / bi_mlp: 1 - mean cos(h, h + branch(h)) over valid tokens, h the residual stream entering the branch.

    The MLP (or MoE) branch's residual contribution d is its module's output, followed through every child of the
    block applied to it before the residual add (Gemma-2/3's post-feedforward norm, a dropout); then with the block's
    input x and output y (y = x + d_attn + d):
      sequential blocks: attention x -> y - d, MLP y - d -> y;
      parallel blocks:   attention x -> y - d (= x + d_attn), MLP x -> x + d.
    Nothing per token is kept beyond the block: d is dropped once the block's output is seen.
    """

    def __init__(self, num_layers: int, want_attn: bool, want_mlp: bool, device: torch.device):
        self.want = {"bi_attn": want_attn, "bi_mlp": want_mlp}
        self.metrics = tuple(m for m, w in self.want.items() if w)
        self.acc = torch.zeros(2, num_layers, 3, dtype=torch.float64, device=device)
        self.sums = DeviceSums(self.acc)
        self.delta: dict[int, Tensor] = {}
        self.handles = []
        self.parallel = False

    def start(self, run: RunContext) -> None:
        adapter = run.adapter
        if adapter.post_norm_blocks:
            raise MetricError(f"bi_attn/bi_mlp need h + branch(h) on the residual stream, but {adapter.model_type} "
                              f"with {adapter.spec.pre_norm_flag}=False normalises the stream after each branch; score "
                              "whole blocks (metric 'bi') on this model")
        self.parallel = parallel_residual(adapter.config)
        for i, blk in enumerate(adapter.blocks()):
            mlp = adapter.mlp(blk)
            if mlp is None:
                raise MetricError(f"bi_attn/bi_mlp: block {i} has no MLP branch at '{adapter.spec.mlp}'; pass the "
                                  "adapter path (get_adapter(model, mlp=...))")
            self.handles.append(mlp.register_forward_hook(self._branch_hook(i)))
            for _, child in blk.named_children():
                if child is not mlp:
                    self.handles.append(child.register_forward_hook(self._after_hook(i)))

    def _branch_hook(self, i: int):
        def hook(_m, _args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            self.delta[i] = t.detach()
        return hook

    def _after_hook(self, i: int):
        # a child that takes the branch output itself (same tensor) transforms it before the residual add
        def hook(_m, args, out):
            d = self.delta.get(i)
            if d is not None and args and isinstance(args[0], Tensor) and _same(args[0], d):
                t = out[0] if isinstance(out, (tuple, list)) else out
                self.delta[i] = t.detach()
        return hook

    def on_block(self, i: int, h_in: Tensor, h_out: Tensor, ctx: BatchContext) -> None:
        d = self.delta.pop(i, None)
        if d is None:
            raise MetricError(f"bi_attn/bi_mlp: the MLP branch of block {i} did not run in the block's forward")
        dim = h_out.shape[-1]
        y = h_out.detach().reshape(-1, dim)
        dev = y.device
        x = h_in.detach().reshape(-1, dim).to(dev)
        d = d.reshape(-1, dim).to(dev)
        mid = y - d
        valid = ctx.valid if ctx.valid.device == dev else ctx.valid.to(dev)
        acc = self.sums.on(dev)
        if self.want["bi_attn"]:
            cosine_stats_(x, mid, valid, acc[0, i])
        if self.want["bi_mlp"]:
            if self.parallel:
                cosine_stats_(x, x + d, valid, acc[1, i])
            else:
                cosine_stats_(mid, y, valid, acc[1, i])

    def end_batch(self, ctx: BatchContext) -> None:
        self.delta.clear()  # activation-checkpointing recomputation re-fires the branch hooks in backward
        self.sums.merge()

    def finish(self) -> dict[str, Tensor]:
        acc = self.sums.merge().cpu()
        out = {}
        for j, m in enumerate(("bi_attn", "bi_mlp")):
            if self.want[m]:
                out[m] = 1.0 - acc[j, :, 0] / acc[j, :, 2]
        return out

    def accumulators(self) -> list[Tensor]:
        return [self.sums.merge()]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.delta.clear()


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether `a` is `b` or a view of the same memory with the same shape (a detached alias)."""
    return a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


class GateCollector(Collector):
    """gate: -g_l with g_l = sum over valid tokens of <dL/dh_{l+1}, h_{l+1} - h_l>, i.e. minus the derivative of
    the loss L = sum_b L_b (L_b: batch b's mean token cross-entropy) with respect to a gate alpha_l that scales
    block l's update (h_{l+1} = h_l + alpha_l f_l(h_l)) at alpha_l = 1. A block whose update lowers the loss has
    g < 0, so -g > 0; lower = removed first, as for every metric.

    Only activation gradients: a tensor hook on each block output reduces grad * (out - in) over valid tokens
    (float64, through the taylor_stats_ op) the moment that gradient is ready. No weight gradient is needed (the
    engine freezes the weights unless Taylor shares the pass), and the block input/output it holds are the tensors
    backward keeps anyway.
    """

    metrics = ("gate",)
    needs_grad = True

    def __init__(self, num_layers: int, device: torch.device):
        self.acc = torch.zeros(num_layers, 3, dtype=torch.float64, device=device)
        self.sums = DeviceSums(self.acc)
        self.handles = []

    def on_block(self, i: int, h_in: Tensor, h_out: Tensor, ctx: BatchContext) -> None:
        if not h_out.requires_grad:
            raise MetricError(f"gate: block {i}'s output does not require grad; gate is computed in the scorer's "
                              "backward pass (score_fast), not under torch.no_grad()")
        x, y = h_in.detach(), h_out.detach()
        valid = ctx.valid

        def hook(g: Tensor) -> None:
            dim = g.shape[-1]
            m = valid if valid.device == g.device else valid.to(g.device)
            f = (y - x.to(y.device)).reshape(-1, dim)[m]
            taylor_stats_(f, g.reshape(-1, dim)[m], self.sums.on(g.device)[i])

        self.handles.append(h_out.register_hook(hook))

    def after_backward(self, ctx: BatchContext) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def end_batch(self, ctx: BatchContext) -> None:
        self.sums.merge()

    def finish(self) -> dict[str, Tensor]:
        return {"gate": -self.sums.merge()[:, 0].cpu().clone()}

    def accumulators(self) -> list[Tensor]:
        return [self.sums.merge()]

    def close(self) -> None:
        self.after_backward(None)  # type: ignore[arg-type]


class TailCollector(Collector):
    """tail: the reverse-order baseline, data-free. Block l scores l' = L - 1 - l, so the last block ranks first
    for removal (lower = removed first) and a plan of K drops the last K removable blocks."""

    metrics = ("tail",)

    def __init__(self, num_layers: int):
        self.L = num_layers

    def finish(self) -> dict[str, Tensor]:
        return {"tail": torch.arange(self.L - 1, -1, -1, dtype=torch.float64)}
