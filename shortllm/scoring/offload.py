"""Out-of-core scoring: every criterion for a model larger than memory, one block at a time from disk.

`score_checkpoint(path, data, metrics)` works block-major, not batch-major: the model skeleton is
built on the meta device (parameters only; buffers such as rotary frequencies are real), the
embeddings run once, and then block j is read straight from the safetensors files, every
calibration batch goes through it, and it is freed. Peak memory is one block plus the calibration
states, independent of depth; the weights are read once (BI, angular, Mag, PPL) or twice (Taylor).

- BI / angular / Mag: the in-memory collectors, fed block by block (one angular ring per batch).
- PPL: at block j, every removal candidate i < j (its state) and the running state go through
  block j in the same visit; candidate j starts as block j's input. Final norm + chunked LM-head
  loss at the end. L(L-1)/2 block evaluations per batch, one pass over the weights.
- Taylor: the forward stores each block's input; the backward walks the blocks from the top:
  the chunked LM-head loss gives dL/dh_L, block j is reloaded, recomputed from its stored input
  with grad, its output gradient back-propagated, W * G reduced (seed-000 exact semantics: signed
  products summed over batches before |.|, or the streaming mode) and the input gradient passed down.

Each block's call (masks per attention type, position embeddings) is captured by running the
model's own base forward with every block replaced by an identity stub (`replay.BlockCall`), so no
architecture's forward is re-implemented. Results equal `score_fast` on the loaded model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortllm.errors import EmptyLoaderError, MetricError, NonFiniteError, UnsupportedModelError
from shortllm.model.adapters import Adapter, get_adapter
from shortllm.model.hooks import block_input
from shortllm.model.replay import BlockCall, _patched_forwards
from shortllm.ops import taylor_stats_
from shortllm.scoring.collectors import CosineCollector
from shortllm.scoring.context import BatchContext, batch_context
from shortllm.scoring.engine import batch_loss, parse_metrics, resolve_n_max
from shortllm.scoring.offload_state import BlockLoader, CheckpointReader, StateStore, build_skeleton

OFFLOAD_METRICS = ("bi", "angular", "mag", "taylor", "ppl")


def _outside_blocks(model: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, str]]:
    """(module, prefix) of every parameter-holding leaf outside the decoder blocks and the LM head."""
    head = adapter.lm_head()
    blocks = adapter.blocks()
    skip = {id(m) for m in blocks.modules()} | {id(head)}
    return [(m, n) for n, m in model.named_modules()
            if id(m) not in skip and any(True for _ in m.parameters(recurse=False))]


# ---- capture ------------------------------------------------------------------------------------------

def capture_identity(model: nn.Module, adapter: Adapter, ctx: BatchContext) -> tuple[Tensor, list[BlockCall]]:
    """(h_0, calls) of one batch: the base forward runs with every block an identity stub (no block weight
    is needed). Checks that the model hands each block's output unchanged to the next block."""
    blocks = adapter.blocks()
    calls: list[Optional[BlockCall]] = [None] * len(blocks)
    seen: list[Tensor] = []

    def make(i, _orig):
        def stub(*args, **kwargs):
            calls[i] = BlockCall.from_call(args, kwargs)
            seen.append(block_input(args, kwargs))
            return seen[-1]
        return stub

    with torch.no_grad(), _patched_forwards(blocks, make):
        model.base_model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
    if any(c is None for c in calls) or any(s is not seen[0] for s in seen):
        raise UnsupportedModelError(f"{type(model).__name__}: the decoder blocks are not called once each in a "
                                    "chain (block i's output as block i+1's input), which out-of-core scoring "
                                    "relies on; score this model in memory with score_fast")
    return seen[0], calls


# ---- the engine --------------------------------------------------------------------------------------

def _state_bytes(ctxs: list[BatchContext], d: int, dtype: torch.dtype) -> int:
    return sum(c.input_ids.numel() for c in ctxs) * d * torch.empty((), dtype=dtype).element_size()


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _taylor_loss(adapter: Adapter, h_last: Tensor, ctx: BatchContext) -> Tensor:
    """The engine's loss from the last block's raw output (final norm applied here)."""
    return batch_loss(adapter, adapter.head_input(h_last), ctx)


class OffloadScorer:
    def __init__(self, path: Path, metrics: tuple[str, ...], *, n_max: Optional[int], angular_tokens: str,
                 taylor_mode: str, dtype: Optional[torch.dtype], device: str | torch.device,
                 attn_implementation: Optional[str], spill: str, spill_dir: Optional[str], progress: bool,
                 check_finite: bool):
        self.path, self.metrics = path, metrics
        self.reader = CheckpointReader(path)
        if dtype is None:
            dtype = _checkpoint_dtype(self.reader)
        self.dtype, self.device = dtype, torch.device(device)
        self.model = build_skeleton(path, dtype, attn_implementation)
        self.adapter = get_adapter(self.model)
        self.loader = BlockLoader(self.model, self.reader, dtype, self.device)
        self.L = self.adapter.num_layers
        self.n_max = resolve_n_max(n_max, self.L)
        self.angular_tokens, self.taylor_mode = angular_tokens, taylor_mode
        if taylor_mode not in ("exact", "streaming"):
            raise MetricError(f"taylor_mode must be 'exact' or 'streaming', got {taylor_mode!r}")
        if spill not in ("auto", "memory", "disk"):
            raise MetricError(f"spill must be 'auto', 'memory' or 'disk', got {spill!r}")
        self.spill, self.spill_dir = spill, spill_dir
        self.progress, self.check_finite = progress, check_finite
        self.stats: dict = {}

    def _bar(self, it, desc):
        return tqdm(it, desc=desc, unit="block", disable=not self.progress)

    def _block_prefix(self, j: int) -> str:
        return f"{self.adapter.spec.blocks}.{j}"

    def _check(self, h: Tensor, j: int, ctx: BatchContext) -> None:
        if self.check_finite and not bool(torch.isfinite(h).all()):
            raise NonFiniteError(f"NaN/Inf in the output of block {j} on calibration batch {ctx.index}; the model "
                                 "overflows in this dtype or its weights are corrupted: score in float32 "
                                 "(dtype=torch.float32, --dtype float32) or check the checkpoint")

    def run(self, batches: list[dict]):
        ctxs = [batch_context(i, b, self.model, self.device) for i, b in enumerate(batches)]
        want_cos = "bi" in self.metrics or "angular" in self.metrics
        want_ppl, want_taylor = "ppl" in self.metrics, "taylor" in self.metrics
        # materialise everything outside the blocks but the LM head, capture the block calls, drop embeddings
        for mod, prefix in _outside_blocks(self.model, self.adapter):
            self.loader.load(mod, prefix, recurse=False)
        h0, calls = [], []
        for ctx in ctxs:
            h, c = capture_identity(self.model, self.adapter, ctx)
            h0.append(h)
            calls.append(c)
        for emb in self.adapter.embeddings():
            BlockLoader.free(emb)
        d = h0[0].shape[-1]
        one = _state_bytes(ctxs, d, h0[0].dtype)
        need = one * ((self.L if want_ppl else 0) + (self.L + 1 if want_taylor else 0))
        spill = self.spill == "disk" or (self.spill == "auto" and need > _mem_available() // 2)
        store = StateStore(spill, self.spill_dir, need)
        self.stats.update(state_bytes_per_boundary=one, stored_state_bytes=need, spilled=spill)
        try:
            results = self._forward(ctxs, calls, h0, store, want_cos, want_ppl, want_taylor)
            results.update(self._head_and_backward(ctxs, calls, store, want_ppl, want_taylor))
        finally:
            self.stats["spill_bytes_written"] = store.bytes_written
            store.close()
        self.stats["bytes_read"] = self.reader.bytes_read
        return results, sum(c.n_valid for c in ctxs)

    def _forward(self, ctxs, calls, h0, store, want_cos, want_ppl, want_taylor) -> dict:
        blocks = self.adapter.blocks()
        cos = [CosineCollector(self.L, self.n_max, self.angular_tokens, "bi" in self.metrics,
                               "angular" in self.metrics, self.device) for _ in ctxs] if want_cos else []
        mag = torch.zeros(self.L, 3, dtype=torch.float64, device=self.device)
        running = list(h0)
        bar = self._bar(range(self.L), "offload forward")
        with torch.no_grad():
            for j in bar:
                blk = blocks[j]
                self.loader.load(blk, self._block_prefix(j))
                for _, p in self.adapter.block_weights(blk):
                    taylor_stats_(p.detach(), None, mag[j])
                for b, ctx in enumerate(ctxs if want_cos or want_ppl or want_taylor else ()):
                    h_in = running[b]
                    if want_taylor:
                        store.put(("in", j, b), h_in)
                    h_out = calls[b][j].run(blk, h_in)
                    self._check(h_out, j, ctx)
                    for_b = cos[b] if cos else None
                    if for_b is not None:
                        for_b.on_block(j, h_in, h_out, ctx)
                    if want_ppl:
                        for i in range(j):
                            store.put(("c", i, b), calls[b][j].run(blk, store.get(("c", i, b), self.device)))
                        store.put(("c", j, b), h_in)
                    running[b] = h_out
                BlockLoader.free(blk)
                bar.set_postfix(read=f"{self.reader.bytes_read / 2**30:.2f}GiB")
        self.running = running
        out: dict = {}
        if cos:
            total = cos[0]
            for c in cos[1:]:
                total.acc += c.acc
                if total.bi_acc is not None:
                    total.bi_acc += c.bi_acc
            out.update(total.finish())
        if "mag" in self.metrics:
            out["mag"] = mag[:, 2].cpu().clone()
        return out

    def _head_and_backward(self, ctxs, calls, store, want_ppl, want_taylor) -> dict:
        from shortllm.scoring.ppl import HeadLoss

        head = self.adapter.lm_head()
        head_prefix = next(n for n, m in self.model.named_modules() if m is head)
        self.loader.load(head, head_prefix)  # also read for the fingerprint when no metric needs it
        out: dict = {}
        if want_ppl:
            nll = torch.zeros(self.L, dtype=torch.float64)
            losses = [HeadLoss(self.adapter, c.input_ids, c.attention_mask) for c in ctxs]
            count = sum(x.n_tokens for x in losses)
            if count == 0:
                raise EmptyLoaderError("no token had a valid next token to predict; the ppl metric needs sequences "
                                       "of at least 2 valid tokens (use seq_len >= 2)")
            with torch.no_grad():
                for i in self._bar(range(self.L), "offload ppl head"):
                    for b, loss in enumerate(losses):
                        nll[i] += loss.nll_sum(store.get(("c", i, b), self.device))
                        store.pop(("c", i, b))
            out["ppl"] = torch.exp(nll / count)
        grads: list[Optional[Tensor]] = []
        if want_taylor:
            for b, ctx in enumerate(ctxs):
                h = self.running[b].detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = _taylor_loss(self.adapter, h, ctx)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"non-finite loss on calibration batch {ctx.index}; score in float32")
                    (g,) = torch.autograd.grad(loss, h)
                grads.append(g)
        BlockLoader.free(head)
        self.running = []
        if want_taylor:
            out["taylor"] = self._backward(ctxs, calls, store, grads)
        return out

    def _backward(self, ctxs, calls, store, grads: list[Tensor]) -> Tensor:
        blocks = self.adapter.blocks()
        acc = torch.zeros(self.L, 3, dtype=torch.float64, device=self.device)
        stream = self.taylor_mode == "streaming" or len(ctxs) == 1
        bar = self._bar(range(self.L - 1, -1, -1), "offload taylor backward")
        for j in bar:
            blk = blocks[j]
            names = [n for n, _ in self.adapter.block_weights(blk)]
            self.loader.load(blk, self._block_prefix(j), requires_grad=names)
            weights = self.adapter.block_weights(blk)
            buffers: dict[int, Tensor] = {}

            def hook(p, i=j, buffers=buffers):
                # the same reduction as metrics.TaylorCollector, so results match score_fast
                if stream:
                    taylor_stats_(p.detach(), p.grad, acc[i])
                    p.grad = None
                elif p.dtype.itemsize < 4:  # fp16/bf16 sum in fp32 buffers, as metrics.TaylorCollector
                    buf = buffers.get(id(p))
                    if buf is None:
                        buffers[id(p)] = p.grad.float()
                    else:
                        buf.add_(p.grad)
                    p.grad = None

            handles = [p.register_post_accumulate_grad_hook(hook) for _, p in weights]
            try:
                for b, _ in enumerate(ctxs):
                    x = store.get(("in", j, b), self.device).detach()
                    if j > 0:
                        x.requires_grad_(True)
                    with torch.enable_grad():
                        y = calls[b][j].run(blk, x)
                        torch.autograd.backward(y, grads[b])
                    grads[b] = x.grad if j > 0 else None
                    store.pop(("in", j, b))
                if not stream:
                    for _, p in weights:
                        g = buffers.pop(id(p), None)
                        g = p.grad if g is None else g
                        if g is not None:
                            taylor_stats_(p.detach(), g, acc[j])
                        p.grad = None
            finally:
                for h in handles:
                    h.remove()
                buffers.clear()
            BlockLoader.free(blk)
            bar.set_postfix(read=f"{self.reader.bytes_read / 2**30:.2f}GiB")
        return acc[:, 1].cpu().clone()


def _checkpoint_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype most of the checkpoint's floating-point bytes are stored in."""
    by: dict[torch.dtype, int] = {}
    for e in reader.entries.values():
        if e.dtype.is_floating_point:
            by[e.dtype] = by.get(e.dtype, 0) + e.end - e.begin
    return max(by, key=by.get) if by else torch.float32


def score_checkpoint(
    path: str | os.PathLike,
    data: Iterable[dict],
    metrics: Sequence[str] | str = OFFLOAD_METRICS,
    *,
    n_max: Optional[int] = None,
    angular_tokens: str = "all",
    taylor_mode: str = "exact",
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
    attn_implementation: Optional[str] = None,
    spill: str = "auto",
    spill_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
    check_finite: bool = True,
    model_name: Optional[str] = None,
):
    """Score every block of the local safetensors checkpoint `path` without ever holding the model in memory.

    Args:
        path: a directory with config.json and model.safetensors, or sharded *.safetensors + index.
        data: calibration batches ({"input_ids", "attention_mask"}), as for `score_fast`; all of them are
            kept (as token ids and hidden states) because every block sees every batch.
        metrics: any of "bi", "angular", "mag", "taylor", "ppl" (SPEC §2), as in `score_fast`.
        dtype: compute dtype (default: the checkpoint's storage dtype). Scores equal `score_fast` on the
            model loaded in that dtype.
        attn_implementation: e.g. "eager" or "sdpa" (default: transformers' default).
        spill: where removal-candidate (PPL) and stored (Taylor) states live: "memory", "disk" (a
            temporary directory under `spill_dir`), or "auto" (disk when they need more than half the
            available memory). Raises DiskSpaceError when the disk lacks room.

    Returns: `Scores` (meta["offload"] holds bytes read, state sizes and whether states were spilled).
    """
    from shortllm.scoring.scores import Scores

    metrics = parse_metrics(metrics, allowed=OFFLOAD_METRICS)
    if angular_tokens not in ("all", "last"):
        raise MetricError(f"angular_tokens must be 'all' or 'last', got {angular_tokens!r}")
    batches = list(data)
    if not batches:
        raise EmptyLoaderError("the calibration loader yielded no batch; give it at least one text "
                               "(e.g. calibration_loader('wikitext2', tokenizer, n_samples=10))")
    path = Path(path)
    scorer = OffloadScorer(path, metrics, n_max=n_max, angular_tokens=angular_tokens, taylor_mode=taylor_mode,
                           dtype=dtype, device=device, attn_implementation=attn_implementation, spill=spill,
                           spill_dir=str(spill_dir) if spill_dir is not None else None, progress=progress,
                           check_finite=check_finite)
    results, n_tokens = scorer.run(batches)
    options = {"n_max": scorer.n_max, "angular_tokens": angular_tokens, "taylor_mode": taylor_mode,
               "offload": "disk", "dtype": str(scorer.dtype).replace("torch.", "")}
    scores = Scores.build(scorer.model, scorer.adapter, {m: results[m] for m in metrics}, data=data,
                          n_tokens=n_tokens, model_name=model_name or str(path), options=options)
    scores.meta["fingerprint"] = scorer.loader.fingerprint()
    scores.meta["offload"] = dict(scorer.stats)
    return scores
