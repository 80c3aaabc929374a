"""Straightforward implementations the way the anchors compute the metrics, used as test oracles.

They store what `score_fast` never stores (every hidden state, every full gradient plus salience
copies) and are written for clarity, not speed. Two deliberate corrections of the anchors, both SPEC §2:
the last block is scored on its raw output (HF's `hidden_states[-1]` is final-normed, so it is taken
from a hook instead), and padding tokens never count.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from shortllm.model.adapters import get_adapter
from shortllm.model.hooks import block_input, block_output
from shortllm.model.replay import zeroed_branches


def _hidden_states(model: nn.Module, batch: dict) -> list[Tensor]:
    """h_0 .. h_L in float64: HF's output_hidden_states for the inputs, a hook for the raw last output."""
    adapter = get_adapter(model)
    last: list[Tensor] = []
    handle = adapter.blocks()[-1].register_forward_hook(lambda m, a, o: last.append(block_output(o)))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hs = list(out.hidden_states[: adapter.num_layers]) + [last[0]]
    return [h.to(torch.float64) for h in hs]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    dot = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den == 0, torch.ones_like(dot), dot / torch.where(den == 0, 1.0, den)).clamp(-1, 1)


def bi_angular_reference(model: nn.Module, data: Iterable[dict], n_max: int,
                         angular_tokens: str = "all") -> dict[str, Tensor]:
    """ShortGPT BI [L] and Gromov angular distance [n_max, L] from full hidden-state lists."""
    L = get_adapter(model).num_layers
    cos_sum = torch.zeros(L, dtype=torch.float64)
    n_all = 0.0
    ang_sum = torch.zeros(n_max, L, dtype=torch.float64)
    n_ang = 0.0
    for batch in data:
        mask = batch["attention_mask"].bool()
        hs = _hidden_states(model, batch)
        if angular_tokens == "last":
            last_idx = mask.long().cumsum(1).argmax(1)
            sel = torch.zeros_like(mask)
            sel[torch.arange(mask.shape[0]), last_idx] = True
        else:
            sel = mask
        n_all += float(mask.sum())
        n_ang += float(sel.sum())
        for i in range(L):
            cos_sum[i] += _cos(hs[i], hs[i + 1])[mask].sum()
            for n in range(1, n_max + 1):
                if i + n <= L:
                    ang_sum[n - 1, i] += (torch.arccos(_cos(hs[i], hs[i + n])) / math.pi)[sel].sum()
    ang = ang_sum / n_ang
    for n in range(1, n_max + 1):
        ang[n - 1, L - n + 1:] = float("nan")
    return {"bi": 1.0 - cos_sum / n_all, "angular": ang}


def _block_weight_names(model: nn.Module) -> dict[str, int]:
    adapter = get_adapter(model)
    ids = {}
    for i, blk in enumerate(adapter.blocks()):
        for _, p in adapter.block_weights(blk):
            ids[id(p)] = i
    return {name: ids[id(p)] for name, p in model.named_parameters() if id(p) in ids}


def taylor_reference(model: nn.Module, data: Iterable[dict], mode: str = "exact") -> Tensor:
    """Seed-000 style: full gradients of every parameter, fp32/64 salience copies W*G summed over batches,
    then per block sum of |salience| (exact) — or sum over batches of |W*G_b| (streaming)."""
    adapter = get_adapter(model)
    names = _block_weight_names(model)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    salience: dict[str, Tensor] = {}
    streaming = torch.zeros(adapter.num_layers, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in data:
            # a prediction counts iff the token it is made from and the one it predicts are both valid
            am = batch["attention_mask"]
            labels = batch["input_ids"].masked_fill(am == 0, -100)
            labels[:, 1:] = labels[:, 1:].masked_fill(am[:, :-1] == 0, -100)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            # the loss in the logits' own dtype: HF's `labels=` path downcasts float64 logits to float32
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
            for n, i in names.items():
                p = params[n]
                s = p.detach().to(torch.float64) * p.grad.to(torch.float64)
                salience[n] = salience[n] + s if n in salience else s
                streaming[i] += s.abs().sum()
        model.zero_grad(set_to_none=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if mode == "streaming":
        return streaming
    exact = torch.zeros(adapter.num_layers, dtype=torch.float64)
    for n, i in names.items():
        exact[i] += salience[n].abs().sum()
    return exact


def mag_reference(model: nn.Module) -> Tensor:
    names = _block_weight_names(model)
    out = torch.zeros(get_adapter(model).num_layers, dtype=torch.float64)
    for n, p in model.named_parameters():
        if n in names:
            out[names[n]] += p.detach().to(torch.float64).abs().sum()
    return out


def score_reference(model: nn.Module, data: Iterable[dict], metrics=("bi", "angular", "taylor", "mag"),
                    n_max: Optional[int] = None, angular_tokens: str = "all",
                    taylor_mode: str = "exact") -> dict[str, Tensor]:
    data = list(data)
    L = get_adapter(model).num_layers
    n_max = n_max or max(1, min(8, L - 1))
    out: dict[str, Tensor] = {}
    if "bi" in metrics or "angular" in metrics:
        ba = bi_angular_reference(model, data, n_max, angular_tokens)
        out.update({k: v for k, v in ba.items() if k in metrics})
    if "taylor" in metrics:
        out["taylor"] = taylor_reference(model, data, taylor_mode)
    if "mag" in metrics:
        out["mag"] = mag_reference(model)
    return out


def _block_outputs(model: nn.Module, batch: dict) -> list[Tensor]:
    """Every block's raw output for one batch, stored whole (float64), from forward hooks."""
    adapter = get_adapter(model)
    outs: dict[int, Tensor] = {}
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, block_output(o).to(torch.float64)))
               for i, blk in enumerate(adapter.blocks())]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(adapter.num_layers)]


def sublayer_reference(model: nn.Module, data: Iterable[dict], parallel: bool = False) -> dict[str, Tensor]:
    """bi_attn / bi_mlp [L] as 1 - mean cos(h, h + branch(h)) over valid tokens, each h + branch(h) measured as
    the block's output with the OTHER branch removed (zeroed, as pruning removes it) — one full forward per
    block and branch. Sequential blocks: attention h_l -> block_l(h_l) without its MLP; MLP that -> h_{l+1}.
    Parallel blocks (`parallel=True`): attention as above, MLP h_l -> block_l(h_l) without its attention."""
    adapter = get_adapter(model)
    L = adapter.num_layers
    sums = {"bi_attn": torch.zeros(L, dtype=torch.float64), "bi_mlp": torch.zeros(L, dtype=torch.float64)}
    n = 0.0
    for batch in data:
        mask = batch["attention_mask"].bool()
        hs = _hidden_states(model, batch)
        n += float(mask.sum())
        for i in range(L):
            with zeroed_branches(adapter, [("mlp", i)]):
                after_attn = _block_outputs(model, batch)[i]
            sums["bi_attn"][i] += _cos(hs[i], after_attn)[mask].sum()
            if parallel:
                with zeroed_branches(adapter, [("attn", i)]):
                    after_mlp = _block_outputs(model, batch)[i]
                sums["bi_mlp"][i] += _cos(hs[i], after_mlp)[mask].sum()
            else:
                sums["bi_mlp"][i] += _cos(after_attn, hs[i + 1])[mask].sum()
    return {k: 1.0 - v / n for k, v in sums.items()}


def gate_reference(model: nn.Module, data: Iterable[dict]) -> Tensor:
    """-dL/dalpha_l at alpha = 1 for real gates: every block's output becomes in + alpha_l (out - in) (a forward
    hook), L = sum over batches of the mean next-token cross-entropy of the model's own logits (padding ignored),
    differentiated by torch.autograd.grad with every weight frozen."""
    adapter = get_adapter(model)
    L = adapter.num_layers
    dtype = next(model.parameters()).dtype
    alphas = [torch.ones((), dtype=dtype, requires_grad=True) for _ in range(L)]

    def gate(i):
        def hook(_m, args, kwargs, out):
            h_in, h_out = block_input(args, kwargs), block_output(out)
            new = h_in + alphas[i] * (h_out - h_in)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        return hook

    flags = {id(p): p.requires_grad for p in model.parameters()}
    handles = [blk.register_forward_hook(gate(i), with_kwargs=True) for i, blk in enumerate(adapter.blocks())]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        total = torch.zeros(L, dtype=torch.float64)
        for batch in data:
            am = batch["attention_mask"]
            labels = batch["input_ids"].masked_fill(am == 0, -100)
            labels[:, 1:] = labels[:, 1:].masked_fill(am[:, :-1] == 0, -100)
            with torch.enable_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=am, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         labels[:, 1:].reshape(-1), ignore_index=-100)
                grads = torch.autograd.grad(loss, alphas)
            total += torch.stack([g.to(torch.float64) for g in grads])
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return -total
