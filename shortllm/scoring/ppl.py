"""PPL criterion (SPEC §2): P_i = exp(mean token NLL of the calibration set with block i removed).

Prefix reuse: the scorer's forward already walks the blocks with the running residual h_i; at block
i the collector runs only the suffix i+1..L-1 from h_i (each block with its own captured call, see
`shortllm.model.replay`), then the final norm and the chunked LM-head cross-entropy. That is L(L-1)/2 block
evaluations plus L heads per batch instead of L(L-1) + L, with at most a few hidden states alive.
Equal to physically deleting block i (layer list and per-layer config rewritten) to float tolerance.

Tokens: labels = input_ids shifted by one; a prediction counts iff both the token it is made from and
the token it predicts have attention_mask 1 (`context.next_token_targets`, shared with the engine's
Taylor loss; with right padding it is Hugging Face's `labels` with -100 on padding).
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortllm.errors import EmptyLoaderError
from shortllm.model.adapters import Adapter, get_adapter
from shortllm.model.replay import BlockCall, capture_calls, layers_removed, run_blocks
from shortllm.ops import lm_head_nll
from shortllm.ops.cross_entropy import lm_head_nll_ref
from shortllm.scoring.collectors import Collector, DeviceSums
from shortllm.scoring.context import BatchContext, RunContext, next_token_targets

_F64_ROWS = 256  # row chunk of the float64 head (only used for float64 models)
_CHUNK_ELEMS = 1 << 24  # float32 logits per row chunk of the "torch" head: 64 MB
# "op": shortllm.ops.lm_head_nll (the dispatched fused op: Triton/CUDA/C++ kernels);
# "torch": row chunks of F.linear + F.cross_entropy (same definition; forward only);
# "auto": the op on CUDA; "torch" elsewhere: on CPU the GEMM + ATen log_softmax is faster than the
# op's current CPU kernels (measured: ~0.14 s vs ~0.21 s per 127 x 49,152 head), and the ppl metric
# runs one head per candidate, so the head's speed sets the prefix-reuse ratio (benchmarks/results/ppl.md).
HEAD_IMPLS = ("auto", "op", "torch")


class HeadLoss:
    """Token NLL of one batch's final residual stream through final norm + LM head (chunked, no [N, V] logits).

    Only the rows whose prediction counts (`next_token_targets`) go through the norm and the head.
    """

    def __init__(self, adapter: Adapter, input_ids: Tensor, attention_mask: Optional[Tensor], impl: str = "auto"):
        if impl not in HEAD_IMPLS:
            from shortllm.errors import MetricError
            raise MetricError(f"ppl head implementation must be one of {HEAD_IMPLS}, got {impl!r}")
        self.adapter, self.impl = adapter, impl
        self.head = adapter.head_params()
        targets = next_token_targets(input_ids, attention_mask).reshape(-1)
        self.rows = (targets != -100).nonzero()[:, 0]
        self.targets = targets[self.rows]
        self.n_tokens = int(self.rows.numel())
        # rows / targets copied once per device the last block or the head lives on (device_map)
        self._moved: dict[tuple[str, torch.device], Tensor] = {}

    def _on(self, name: str, device: torch.device) -> Tensor:
        t = getattr(self, name)
        if t.device == device:
            return t
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = t.to(device)
        return self._moved[key]

    @torch.no_grad()
    def nll_sum(self, h: Tensor) -> float:
        """Sum of token NLLs (float64) of the model whose last residual stream is `h` [B, T, D]."""
        return float(self.nll_sum_tensor(h))

    @torch.no_grad()
    def nll_sum_tensor(self, h: Tensor) -> Tensor:
        """`nll_sum` as a float64 scalar tensor on the head's device: no host sync (the ppl metric calls it once
        per block). `h` may live on another device than the batch or the head (a model spread with device_map)."""
        if self.n_tokens == 0:
            return torch.zeros((), dtype=torch.float64, device=h.device)
        x = h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, self._on("rows", h.device))
        x = self.adapter.head_input(_to_module_device(x, self.adapter.final_norm()))
        hp = self.head
        x = _to_module_device(x, self.adapter.lm_head())
        targets = self._on("targets", x.device)
        if x.dtype == torch.float64:
            # the op computes logits in float32; float64 models keep float64 end to end
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            for s in range(0, x.shape[0], _F64_ROWS):
                total += lm_head_nll_ref(x[s:s + _F64_ROWS], hp["weight"], targets[s:s + _F64_ROWS],
                                         bias=hp["bias"], softcap=hp["softcap"], scale=hp["scale"]).sum()
            return total
        if self.impl == "torch" or (self.impl == "auto" and x.device.type != "cuda"):
            return _torch_head_nll_sum(x, hp, targets)
        nll = lm_head_nll(x, hp["weight"], targets, bias=hp["bias"], softcap=hp["softcap"], scale=hp["scale"])
        return nll.sum(dtype=torch.float64)


def _to_module_device(x: Tensor, module: Optional[nn.Module]) -> Tensor:
    """`x` on the device of `module`'s weights. Left alone when accelerate manages the module (its hook moves
    inputs to the execution device; the weights themselves may be on `meta`) or the module has no weights."""
    if module is None or hasattr(module, "_hf_hook"):
        return x
    p = next(module.parameters(), None)
    return x if p is None or p.device == x.device else x.to(p.device)


def _torch_head_nll_sum(x: Tensor, hp: dict, targets: Tensor) -> Tensor:
    """Sum of token NLLs (float64 scalar on x's device) through row chunks of the head: at most ~64 MB of
    logits at a time."""
    rows = max(1, _CHUNK_ELEMS // hp["weight"].shape[0])
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], rows):
        z = torch.nn.functional.linear(x[s:s + rows], hp["weight"], hp["bias"]).float()
        if hp["scale"] != 1.0:
            z = z * hp["scale"]
        if hp["softcap"] > 0:
            z = torch.tanh(z / hp["softcap"]) * hp["softcap"]
        total += torch.nn.functional.cross_entropy(z, targets[s:s + rows], reduction="none").sum(dtype=torch.float64)
    return total


class PPLCollector(Collector):
    """`ppl` metric of `score_fast`: per-block removal perplexity with prefix reuse.

    begin_batch captures every block's call (a capture pass: embeddings, masks, one block); the engine's
    forward then hands h_i to `on_block(i)`, which runs blocks i+1..L-1 on it and the head.
    """

    metrics = ("ppl",)

    def __init__(self, num_layers: int, device: torch.device, ppl_head: str = "auto", **options):
        from shortllm.errors import MetricError
        if options:
            raise MetricError(f"unknown ppl option(s) {sorted(options)}; the ppl metric takes ppl_head= "
                              f"(one of {HEAD_IMPLS})")
        if ppl_head not in HEAD_IMPLS:
            raise MetricError(f"ppl_head must be one of {HEAD_IMPLS}, got {ppl_head!r}")
        self.L, self.head_impl = num_layers, ppl_head
        # on the model's device like the other collectors' sums (data-parallel all-reduce); a head on another
        # device adds into its own copy, merged once per batch
        self.nll = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.sums = DeviceSums(self.nll)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.calls: Optional[list[BlockCall]] = None
        self.loss: Optional[HeadLoss] = None
        self.bar = None

    def start(self, run: RunContext) -> None:
        self.model, self.adapter = run.model, run.adapter
        self.progress = bool(run.progress)

    def begin_batch(self, ctx: BatchContext) -> None:
        _, self.calls = capture_calls(self.model, self.adapter, ctx.input_ids, ctx.attention_mask)
        self.loss = HeadLoss(self.adapter, ctx.input_ids, ctx.attention_mask, self.head_impl)
        self.bar = tqdm(total=self.L, desc=f"ppl batch {ctx.index}: block", unit="block", leave=False,
                        disable=not self.progress)

    def on_block(self, i: int, h_in: Tensor, h_out: Tensor, ctx: BatchContext) -> None:
        blocks = self.adapter.blocks()
        with torch.no_grad():
            h = run_blocks(blocks, self.calls, h_in.detach(), range(i + 1, self.L))
            nll = self.loss.nll_sum_tensor(h)
            self.sums.on(nll.device)[i] += nll
        self.bar.update(1)

    def end_batch(self, ctx: BatchContext) -> None:
        self.sums.merge()
        self.count += self.loss.n_tokens
        self.calls, self.loss = None, None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> dict[str, Tensor]:
        self.sums.merge()
        if float(self.count) == 0:
            raise EmptyLoaderError("no token had a valid next token to predict; the ppl metric needs sequences "
                                   "of at least 2 valid tokens (use seq_len >= 2)")
        return {"ppl": torch.exp(self.nll / self.count).cpu()}

    def accumulators(self) -> list[Tensor]:
        return [self.sums.merge(), self.count]

    def close(self) -> None:
        self.calls, self.loss = None, None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- references (naive: one full forward per candidate) ----------------------------------------------

def _batches(data: Iterable[dict]) -> list[dict]:
    batches = list(data)
    if not batches:
        raise EmptyLoaderError("the calibration loader yielded no batch; give it at least one text "
                               "(e.g. calibration_loader('wikitext2', tokenizer, n_samples=10))")
    return batches


def mean_nll_full(model: nn.Module, data: Iterable[dict], float64: bool = True) -> float:
    """Mean token NLL the ordinary way: the model's full [B, T, V] logits and cross-entropy, summed over
    tokens (log-softmax in float64 when `float64`, else `F.cross_entropy` in the logits' dtype)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(data):
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = ids[:, 1:]
            if mask is not None:  # written out, not `next_token_targets`: this is the oracle
                targets = targets.masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
            z = logits[:, :-1].reshape(-1, logits.shape[-1])
            z = z.double() if float64 else z
            total += float(torch.nn.functional.cross_entropy(z, targets.reshape(-1), ignore_index=-100,
                                                             reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def delete_blocks_copy(model: nn.Module, drop: Iterable[int]) -> nn.Module:
    """A deep copy of `model` with blocks `drop` physically deleted: layer list, num_hidden_layers,
    per-layer config (`layer_types`) and each attention's `layer_idx` rewritten."""
    m = copy.deepcopy(model)
    adapter = get_adapter(m)
    drop = sorted(set(int(i) for i in drop), reverse=True)
    layers = adapter.blocks()
    cfg = m.config
    for k in adapter.spec.per_layer_config:
        v = getattr(cfg, k, None)
        if v is not None:
            setattr(cfg, k, [x for j, x in enumerate(v) if j not in drop])
    for i in drop:
        del layers[i]
    setattr(cfg, adapter.spec.num_layers_key, len(layers))
    for new_idx, blk in enumerate(layers):
        for mod in blk.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    return m


def removal_ppl_naive(model: nn.Module, data: Iterable[dict], adapter: Optional[Adapter] = None,
                      progress: bool = False, float64: bool = True) -> Tensor:
    """P_i for every block by L full forwards, each with block i skipped through the layer list."""
    adapter = adapter or get_adapter(model)
    batches = _batches(data)
    out = torch.empty(adapter.num_layers, dtype=torch.float64)
    for i in tqdm(range(adapter.num_layers), desc="naive ppl: block", disable=not progress):
        with layers_removed(model, adapter, [i]):
            out[i] = math.exp(mean_nll_full(model, batches, float64))
    return out
