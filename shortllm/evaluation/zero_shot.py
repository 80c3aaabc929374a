"""Zero-shot accuracy with lm-eval-harness 0.4 semantics (log-likelihood of each choice).

Prompts and item parsing live in `shortllm.data.tasks`; this module scores them: the pair encoding,
the batched log-likelihoods (through the chunked LM-head NLL op), and the per-task metrics.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from shortllm.data.tasks import DEFAULT_TASKS, load_task, score_items, task_spec
from shortllm.errors import DataError
from shortllm.evaluation.corpus_ppl import tokenizer_adds_bos
from shortllm.evaluation.head import encode_text, head_hidden, lm_head_and_params
from shortllm.model.adapters import model_device
from shortllm.ops import lm_head_nll


def _encode_default(tokenizer, text: str) -> list[int]:
    # lm-eval's HFLM.tok_encode with add_bos_token=None: the tokenizer's own special tokens, i.e. BOS in
    # front exactly when the tokenizer adds it (Gemma yes, SmolLM2 no) -- the BOS policy of `resolve_bos`
    return list(tokenizer(text, verbose=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4 ``_encode_pair``: trailing spaces of the context move to the continuation; the pair
    is tokenised together (with the tokenizer's default special tokens) and the continuation's tokens are
    those after the context's tokens. An empty context becomes the BOS (else EOS) token, as lm-eval's
    ``prefix_token_id``."""
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], encode_text(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode_default(tokenizer, context + continuation)
    ctx = _encode_default(tokenizer, context)
    return ctx, whole[len(ctx):]


def _max_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   progress: bool = True, desc: str = "loglik") -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation), lm-eval 0.4 semantics:
    input = (ctx + cont)[-(max_length + 1):][:-1]; identical inputs run once (lm-eval's one-token-
    continuation sharing, e.g. BoolQ's " no"/" yes"); longest first, right-padded and masked. A
    continuation whose tokens all merge into the context's scores 0, as in lm-eval."""
    max_len = _max_length(model)
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        c_enc, k_enc = encode_pair(tokenizer, ctx, cont)
        if not k_enc:  # merged into the context's tokens: lm-eval sums over nothing, i.e. 0
            continue
        inp = tuple((c_enc + k_enc)[-(max_len + 1):][:-1])
        groups.setdefault(inp, []).append((i, k_enc[-len(inp):]))
    order = sorted(groups, key=len, reverse=True)
    head, hp = lm_head_and_params(model)
    dev = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(requests)
    bar = tqdm(total=sum(len(g) for g in groups.values()), desc=desc, unit="req", disable=not progress)
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, tgts, owner = [], [], []
        for b, inp in enumerate(batch):
            n = len(inp)
            ids[b, :n] = torch.tensor(inp)
            mask[b, :n] = 1
            for req, cont in groups[inp]:
                rows.append(b * width + torch.arange(n - len(cont), n))
                tgts.extend(cont)
                owner.extend([req] * len(cont))
        h = head_hidden(model, ids.to(dev), mask.to(dev), head=head)
        h = h.reshape(-1, h.shape[-1])[torch.cat(rows).to(dev)]
        nll = lm_head_nll(h, hp["weight"], torch.tensor(tgts, device=dev), hp["bias"], hp["softcap"], hp["scale"])
        acc = torch.zeros(len(requests), dtype=torch.float64).index_add_(0, torch.tensor(owner), nll.double().cpu())
        for req in set(owner):
            out[req] = -float(acc[req])
        bar.update(sum(len(groups[inp]) for inp in batch))
    bar.close()
    return out


@dataclass
class ZeroShotResult:
    tasks: dict
    mean: float
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def zeroshot(model: nn.Module, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, *, limit: Optional[int] = None,
             batch_size: int = 16, progress: bool = True, data_dir=None,
             return_details: bool = False) -> ZeroShotResult:
    """Zero-shot accuracy, lm-eval-harness 0.4 semantics (prompts: `shortllm.data.tasks`).

    ``limit`` keeps each task's first N items (file order). The mean averages each task's reported
    metric: acc for BoolQ/PIQA/WinoGrande/ARC-e, acc_norm for HellaSwag/ARC-c/OBQA.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise DataError("No tasks given; pass names from: " + ", ".join(DEFAULT_TASKS))
    results = {}
    for name in tasks:
        spec = task_spec(name)
        t0 = time.perf_counter()
        items = load_task(spec.name, data_dir, limit)
        reqs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
        lls = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=spec.name)
        res = score_items(items, lls, spec.metric, return_details)
        res.seconds = round(time.perf_counter() - t0, 2)
        results[spec.name] = res
    mean = sum(r.score for r in results.values()) / len(results)
    return ZeroShotResult(tasks={k: asdict(v) for k, v in results.items()}, mean=mean,
                          settings={"limit": limit, "batch_size": batch_size, "num_fewshot": 0,
                                    "bos": "tokenizer default: BOS " + ("added" if tokenizer is not None and
                                                                       tokenizer_adds_bos(tokenizer) else "not added"),
                                    "semantics": "lm-eval-harness 0.4 (loglikelihood, target delimiter ' ')"})
