"""The one-pass streaming scorer: `score_fast(model, data, metrics=...) -> Scores`.

One forward (and, for Taylor, one backward) per calibration batch. Block hooks hand (input, output)
to the collectors of `collectors.py`, which keep float64 per-block sums; gradients are reduced as they
are accumulated and freed. The LM head's loss goes through the chunked cross-entropy op, so the
[N, V] logits never exist. Model weights, `requires_grad` flags, `.grad` and train/eval mode are
restored afterwards, also on error.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortllm.errors import EmptyLoaderError, MetricError, NonFiniteError
from shortllm.model.adapters import Adapter, get_adapter, model_device
from shortllm.model.hooks import block_input, block_io_hooks, checkpointed_blocks
from shortllm.ops import lm_head_nll
from shortllm.scoring.collectors import (
    Collector,
    CosineCollector,
    MagCollector,
    TaylorCollector,
)
from shortllm.scoring.context import BatchContext, RunContext, batch_context, next_token_targets
from shortllm.scoring.criteria_collectors import GateCollector, SubLayerCollector, TailCollector

METRICS = ("bi", "angular", "taylor", "mag", "ppl", "bi_attn", "bi_mlp", "tail", "gate")
DATA_FREE_METRICS = ("mag", "tail")  # computed from the weights / the block order alone
DEFAULT_METRICS = ("bi", "angular", "taylor", "mag")


def parse_metrics(metrics: Sequence[str] | str, allowed: Sequence[str] = METRICS) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    out = tuple(dict.fromkeys(m.strip().lower() for m in metrics))
    unknown = [m for m in out if m not in allowed]
    if unknown or not out:
        raise MetricError(f"unknown metric(s) {unknown or '(none given)'}; choose from {', '.join(allowed)} "
                          f"(e.g. metrics=('bi', 'angular', 'taylor', 'mag'))")
    return out


def batch_loss(adapter: Adapter, head_in: Tensor, ctx: BatchContext) -> Tensor:
    """Mean token cross-entropy of one batch (labels = input_ids, padding ignored: `next_token_targets`) from
    the LM head's input [B, T, D], through the chunked head: the [N, V] logits never exist."""
    head = adapter.head_params()
    dev = head["weight"].device  # with device_map the head may live elsewhere than the last block
    h = head_in[:, :-1].reshape(-1, head_in.shape[-1]).to(dev)
    targets = next_token_targets(ctx.input_ids, ctx.attention_mask).reshape(-1)
    n = int((targets != -100).sum())
    targets = targets.to(dev)
    if n == 0:
        raise EmptyLoaderError(f"batch {ctx.index}: no position has a next token to predict (sequences of "
                               "length 1); use seq_len >= 2")
    nll = lm_head_nll(h, head["weight"], targets, bias=head["bias"], softcap=head["softcap"], scale=head["scale"])
    return nll.sum() / n


def distributed_reducer():
    """A sum-all-reduce over the default process group, or None when not running distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None

    def reduce_sum(t: Tensor) -> Tensor:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t
    return reduce_sum


def shard_for_rank(data):
    """Each rank takes a disjoint, deterministic share of the batches (round-robin by batch index)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return data
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world == 1:
        return data
    if hasattr(data, "shard"):
        return data.shard(rank, world)
    return [b for i, b in enumerate(data) if i % world == rank]


DEFAULT_CHECKPOINT_EVERY = 10  # batches between resumable-state writes (library and CLI alike)


class Engine:
    """Runs the calibration batches once through the model with the collectors attached."""

    def __init__(self, model: nn.Module, adapter: Adapter, collectors: list[Collector], *,
                 gradient_checkpointing: bool = False, progress: bool = True, check_finite: bool = True):
        self.model, self.adapter, self.collectors = model, adapter, collectors
        self.gradient_checkpointing = gradient_checkpointing
        self.progress, self.check_finite = progress, check_finite
        self.device = model_device(model)
        self.needs_grad = any(c.needs_grad for c in collectors)
        self.needs_weight_grad = any(c.needs_weight_grad for c in collectors)
        self.n_tokens = 0
        self.n_batches = 0
        self._finite: list[Tensor] = []
        self.checkpoint = None  # a resume.ScoringCheckpoint: restores state at start, saves every K batches

    def run_context(self) -> RunContext:
        return RunContext(model=self.model, adapter=self.adapter, device=self.device, progress=self.progress)

    # ---- model state -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _model_state(self):
        model = self.model
        was_training = model.training
        flags = {id(p): p.requires_grad for p in model.parameters()}
        grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
        try:
            model.eval()  # dropout off: scores must be deterministic
            if self.needs_grad:
                for p in model.parameters():
                    p.requires_grad_(False)
                    p.grad = None
                if self.needs_weight_grad:
                    for blk in self.adapter.blocks():
                        for _, p in self.adapter.block_weights(blk):
                            p.requires_grad_(True)
            yield
        finally:
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
                p.grad = grads.get(id(p))
            model.train(was_training)

    # ---- one batch ---------------------------------------------------------------------------
    def _context(self, index: int, batch: dict) -> BatchContext:
        return batch_context(index, batch, self.model, self.device)

    def _on_block(self, ctx: BatchContext):
        cosine_active = any(isinstance(c, CosineCollector) for c in self.collectors)

        def on_block(i: int, h_in: Tensor, h_out: Tensor) -> None:
            for c in self.collectors:
                c.on_block(i, h_in, h_out, ctx)
            if self.check_finite and not cosine_active:
                # padded rows may hold anything (SDPA gives NaN for a fully masked query): only valid rows count
                rows_ok = torch.isfinite(h_out.detach()).reshape(-1, h_out.shape[-1]).all(dim=1)
                valid = ctx.valid if ctx.valid.device == rows_ok.device else ctx.valid.to(rows_ok.device)
                self._finite.append((rows_ok | ~valid).all().to(self.device))
        return on_block

    def _raise_if_nonfinite(self, ctx: BatchContext) -> None:
        bad: Optional[int] = None
        for c in self.collectors:
            if isinstance(c, CosineCollector):
                per_block = ~torch.isfinite(c.acc[0, :, 0])
                if bool(per_block.any()):
                    bad = int(per_block.nonzero()[0])
        if bad is None and self._finite:
            flags = torch.stack(self._finite)
            if not bool(flags.all()):
                bad = int((~flags).nonzero()[0])
        self._finite.clear()
        if bad is not None:
            raise NonFiniteError(f"NaN/Inf in the output of block {bad} on calibration batch {ctx.index}; the model "
                                 "overflows in this dtype or its weights are corrupted: score in float32 "
                                 "(load_model(..., dtype=torch.float32)) or check the checkpoint")

    @contextlib.contextmanager
    def _stream_requires_grad(self):
        """With every weight frozen (activation gradients only: gate) nothing would require grad: block 0's input
        is made a leaf that does, so the backward reaches every block output."""
        if not self.needs_grad or self.needs_weight_grad:
            yield
            return

        def pre(_module, args, kwargs):
            if args:
                return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = block_input(args, kwargs).detach().requires_grad_(True)
            return args, kwargs

        handle = self.adapter.blocks()[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _batch(self, index: int, batch: dict) -> None:
        ctx = self._context(index, batch)
        for c in self.collectors:
            c.begin_batch(ctx)
        with self._stream_requires_grad(), block_io_hooks(self.adapter.blocks(), self._on_block(ctx)):
            if self.needs_grad:
                with torch.enable_grad():
                    out = self.model.base_model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask,
                                                use_cache=False)
                    loss = batch_loss(self.adapter, out[0], ctx)
                    if not torch.isfinite(loss):
                        self._raise_if_nonfinite(ctx)
                        raise NonFiniteError(f"non-finite loss on calibration batch {index}; score in float32")
                    del out
                    loss.backward()
                for c in self.collectors:
                    c.after_backward(ctx)
            else:
                with torch.no_grad():
                    self.model.base_model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask,
                                          use_cache=False)
        for c in self.collectors:
            c.end_batch(ctx)
        if self.check_finite:
            self._raise_if_nonfinite(ctx)
        self.n_tokens += ctx.n_valid
        self.n_batches += 1

    def run(self, data: Iterable[dict], skip_batches: int = 0) -> None:
        total = len(data) if hasattr(data, "__len__") else None
        with self._model_state(), checkpointed_blocks(self.adapter.blocks(),
                                                       self.gradient_checkpointing and self.needs_grad):
            try:
                run = self.run_context()
                for c in self.collectors:
                    c.start(run)
                if self.checkpoint is not None:
                    consumed, tokens = self.checkpoint.restore(self.collectors)
                    if consumed:
                        self.n_batches, self.n_tokens = consumed, tokens
                    skip_batches = max(skip_batches, consumed)
                bar = tqdm(data, total=total, desc="score_fast", unit="batch", disable=not self.progress)
                for index, batch in enumerate(bar):
                    if index < skip_batches:
                        continue
                    self._batch(index, batch)
                    if self.checkpoint is not None:
                        self.checkpoint.after_batch(self.collectors, self.n_batches, self.n_tokens)
                    bar.set_postfix(tokens=self.n_tokens)
                if self.n_batches == 0 and skip_batches == 0:
                    raise EmptyLoaderError("the calibration loader yielded no batch; give it at least one text "
                                           "(e.g. calibration_loader('wikitext2', tokenizer, n_samples=10))")
                reduce_sum = distributed_reducer()
                if reduce_sum is not None:
                    for c in self.collectors:
                        c.sync(reduce_sum)
                    self.n_tokens = int(reduce_sum(torch.tensor(float(self.n_tokens), dtype=torch.float64,
                                                                device=self.device)).item())
                self.results = {}
                for c in self.collectors:
                    self.results.update(c.finish())
            finally:
                for c in self.collectors:
                    c.close()


def build_collectors(metrics: Sequence[str], adapter: Adapter, device: torch.device, *, n_max: int,
                     angular_tokens: str, taylor_mode: str, n_batches: Optional[int], **ppl_options) -> list[Collector]:
    L = adapter.num_layers
    out: list[Collector] = []
    if "bi" in metrics or "angular" in metrics:
        out.append(CosineCollector(L, n_max, angular_tokens, "bi" in metrics, "angular" in metrics, device))
    if "taylor" in metrics:
        out.append(TaylorCollector(L, taylor_mode, device, n_batches))
    if "mag" in metrics:
        out.append(MagCollector(L, device))
    if "bi_attn" in metrics or "bi_mlp" in metrics:
        out.append(SubLayerCollector(L, "bi_attn" in metrics, "bi_mlp" in metrics, device))
    if "gate" in metrics:
        out.append(GateCollector(L, device))
    if "tail" in metrics:
        out.append(TailCollector(L))
    if "ppl" in metrics:
        from shortllm.scoring.ppl import PPLCollector  # the replay machinery is only imported when asked for

        out.append(PPLCollector(L, device, **ppl_options))
    if set(metrics) - {"mag"}:  # a forward runs: per-expert REAP statistics of MoE blocks ride along (last:
        from shortllm.scoring.experts import ExpertCollector  # its begin_batch follows PPL's capture pass)

        out.append(ExpertCollector(L, device))
    return out


def resolve_n_max(n_max: Optional[int], num_layers: int) -> int:
    if n_max is None:
        return max(1, min(8, num_layers - 1))
    if not isinstance(n_max, int) or n_max < 1 or n_max >= num_layers:
        raise MetricError(f"n_max={n_max!r} must be an integer in [1, {num_layers - 1}] for a model of {num_layers} "
                          f"blocks (spans of n_max >= L would remove the whole model)")
    return n_max


def score_fast(
    model: nn.Module,
    data: Iterable[dict],
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    *,
    n_max: Optional[int] = None,
    angular_tokens: str = "all",
    taylor_mode: str = "exact",
    gradient_checkpointing: bool = False,
    adapter: Optional[Adapter] = None,
    progress: bool = True,
    check_finite: bool = True,
    model_name: Optional[str] = None,
    checkpoint: Optional[str] = None,
    every: int = DEFAULT_CHECKPOINT_EVERY,
    **ppl_options,
):
    """Score every decoder block of `model` in one streaming pass over `data`.

    Args:
        model: a Hugging Face causal LM (any architecture `shortllm.model.adapters` knows or discovers, or
            pass `adapter=`).
        data: iterable of {"input_ids": [B, T], "attention_mask": [B, T]} batches, e.g.
            `shortllm.data.calibration_loader("wikitext2", tokenizer)`.
        metrics: any of "bi", "angular", "taylor", "mag", "ppl" (SPEC §2), "bi_attn" / "bi_mlp" (1 - mean
            cos(h, h + branch(h)) of each block's attention / MLP branch), "gate" (minus the derivative of the
            loss with respect to a gate scaling each block's update; activation gradients only) and "tail" (the
            reverse-order baseline: the last block first). Lower score = less important.
        n_max: largest angular span (default min(8, L - 1)); spans are dropped blocks l .. l+n-1.
        angular_tokens: "all" valid tokens, or "last" valid token of each sequence (PruneMe).
        taylor_mode: "exact" (seed-000: signed products summed over batches before |.|) or "streaming"
            (sum over batches of |W * G_b|: every gradient freed as soon as it is reduced).
        gradient_checkpointing: recompute each block in backward (Taylor memory ~ one block of activations).
        checkpoint: a directory (str or PathLike) for resumable scoring: the state is saved there every `every`
            batches, and a rerun with the same arguments continues where it stopped (`shortllm.resume`).

    Returns: `shortllm.Scores`.
    """
    from shortllm.scoring.scores import Scores

    metrics = parse_metrics(metrics)
    if angular_tokens not in ("all", "last"):
        raise MetricError(f"angular_tokens must be 'all' or 'last', got {angular_tokens!r}")
    adapter = adapter or get_adapter(model)
    n_max = resolve_n_max(n_max, adapter.num_layers)
    n_batches = len(data) if hasattr(data, "__len__") else None
    if n_batches == 0 and not set(metrics) <= set(DATA_FREE_METRICS):
        raise EmptyLoaderError("the calibration loader is empty; give it at least one text "
                               "(e.g. calibration_loader('wikitext2', tokenizer, n_samples=10))")
    device = model_device(model)
    collectors = build_collectors(metrics, adapter, device, n_max=n_max, angular_tokens=angular_tokens,
                                  taylor_mode=taylor_mode, n_batches=n_batches, **ppl_options)
    if set(metrics) <= set(DATA_FREE_METRICS):
        engine = Engine(model, adapter, collectors, progress=False)
        with engine._model_state():
            for c in collectors:
                c.start(engine.run_context())
            results = {k: v for c in collectors for k, v in c.finish().items()}
        return Scores.build(model, adapter, results, data=data, n_tokens=0, model_name=model_name,
                            options={"n_max": n_max, "angular_tokens": angular_tokens, "taylor_mode": taylor_mode})
    engine = Engine(model, adapter, collectors, gradient_checkpointing=gradient_checkpointing, progress=progress,
                    check_finite=check_finite)
    shard = shard_for_rank(data)
    if checkpoint is not None:
        from shortllm.scoring.resume import ScoringCheckpoint

        engine.checkpoint = ScoringCheckpoint.for_run(
            checkpoint, every, model=model, data=data, shard=shard, metrics=metrics,
            options={"n_max": n_max, "angular_tokens": angular_tokens, "taylor_mode": taylor_mode,
                     "gradient_checkpointing": gradient_checkpointing, "ppl": ppl_options})
    engine.run(shard)
    return Scores.build(model, adapter, engine.results, data=data, n_tokens=engine.n_tokens, model_name=model_name,
                        options={"n_max": n_max, "angular_tokens": angular_tokens, "taylor_mode": taylor_mode,
                                 "gradient_checkpointing": gradient_checkpointing})
