"""Evaluation: perplexity (LLM-Pruner / Shortened-LLaMA and GPTQ protocols) and lm-eval-style zero-shot.

Perplexity, ``protocol="llm-pruner"`` (LLM-Pruner ``PPLMetric``, reused by Shortened LLaMA
``src/dataset.py``): the split's rows are joined with ``"\\n\\n"`` (WikiText-2 raw **test**, PTB
**validation** -- PTB too is ``"\\n\\n"``-joined there), tokenised ONCE without special tokens, cut into
non-overlapping ``seq_len`` chunks (remainder dropped); PPL = exp(mean NLL over every predicted token).
``bos`` follows Shortened LLaMA's ``add_bos_to_every``:

- ``"none"``: chunks of ``seq_len`` tokens, ``seq_len - 1`` predictions each.
- ``"once"``: BOS is prepended to the whole token stream before chunking (Shortened LLaMA's default,
  and what LLM-Pruner gets from a LLaMA tokenizer's default special tokens): ``(n + 1) // seq_len``
  chunks, the first starts with BOS.
- ``"every_chunk"``: ``n // seq_len`` chunks, each gets BOS prepended (``seq_len + 1`` tokens,
  ``seq_len`` predictions each, the first one predicted from BOS).

``protocol="gptq"`` (GPTQ/SparseGPT/Wanda ``datautils``/``eval``): ``seq_len`` 2048, WikiText-2 joined
with ``"\\n\\n"``, PTB with ``" "``, C4 = ``" ".join`` of the first 1,100 documents cut to 256 chunks
(GPTQ's ``c4_new``; our C4 file is a 2k-document sample, so C4 numbers are C4-like only, see
SOURCES.md). GPTQ calls the tokenizer with its default special tokens: for tokenizers that add BOS
(LLaMA) pass ``bos="once"``; SmolLM2's adds nothing, so ``bos="none"`` is what GPTQ's code does there.

NLL never materialises [tokens, vocab] logits: the model runs up to its LM head's input (captured by a
pre-hook that stops the forward there) and `shortllm.ops.lm_head_nll` applies the head (weight, bias,
logit scale and Gemma's final softcapping) in row chunks. Sums are float64.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import DataError, UnsupportedModelError
from .eval_cli import register_cli, render_markdown  # the `shortllm eval` CLI (loads this module lazily)
from .ops import lm_head_nll
from .tasks import DEFAULT_TASKS, TaskResult, load_task, score_items, task_spec

__all__ = ["PerplexityResult", "TaskResult", "ZeroShotResult", "perplexity", "zeroshot", "loglikelihoods",
           "encode_pair", "head_hidden", "corpus_text", "register_cli", "render_markdown"]

PROTOCOLS = {
    # default seq_len and the row join per corpus (GPTQ: PTB and C4 are " "-joined)
    "llm-pruner": {"seq_len": 128, "join": {"wikitext2": "\n\n", "ptb": "\n\n", "c4": "\n\n"}},
    "gptq": {"seq_len": 2048, "join": {"wikitext2": "\n\n", "ptb": " ", "c4": " "}},
}
EVAL_SPLIT = {"wikitext2": "test", "ptb": "validation", "c4": "validation"}
BOS_MODES = ("none", "once", "every_chunk")


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- model access (one place to swap)
class _StopAtHead(Exception):
    """Raised by the head pre-hook: everything the loss needs has been captured."""


def _head(model: nn.Module) -> tuple[nn.Module, dict]:
    """The LM head module and what `lm_head_nll` needs to reproduce the model's logits exactly."""
    try:
        from .arch import get_adapter
        adapter = get_adapter(model)
        return adapter.lm_head(), adapter.head_params()
    except (ImportError, UnsupportedModelError):
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head; load it with "
                                        "AutoModelForCausalLM.") from None
        cfg = model.config
        return head, {"weight": head.weight, "bias": getattr(head, "bias", None),
                      "softcap": float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
                      "scale": float(getattr(cfg, "logit_scale", None) or 1.0)}


@torch.no_grad()
def head_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                head: Optional[nn.Module] = None) -> Tensor:
    """The LM head's input [B, T, D] for ``input_ids``: whatever the model feeds its head (final norm,
    OPT's project_out, ...), captured by a pre-hook that stops the forward before any logits exist."""
    head = head if head is not None else _head(model)[0]
    box: dict = {}

    def grab(_mod, args, kwargs):
        box["h"] = args[0] if args else next(iter(kwargs.values()))
        raise _StopAtHead

    handle = head.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopAtHead:
        pass
    finally:
        handle.remove()
    if "h" not in box:
        raise UnsupportedModelError(f"{type(model).__name__}.forward never called its LM head "
                                    f"{type(head).__name__}; evaluation needs a *ForCausalLM model.")
    return box["h"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: whole-split strings exceed model_max_length on purpose (we chunk them)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# ---------------------------------------------------------------- perplexity
def _chunks(ids: list[int], seq_len: int, bos: str, bos_id: Optional[int]) -> Tensor:
    if bos == "once":
        ids = [bos_id] + ids
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"The text has {len(ids)} tokens, fewer than one chunk of seq_len={seq_len}; "
                        "use a smaller seq_len or more text.")
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if bos == "every_chunk":
        t = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), t], dim=1)
    return t


def corpus_text(dataset: str, protocol: str = "llm-pruner", split: Optional[str] = None,
                data_dir=None) -> tuple[str, dict]:
    """The text `perplexity` tokenises for ``dataset`` under ``protocol`` (rows joined as the seed code
    joins them; GPTQ's C4 keeps its first 1,100 documents), and what it is: ``{"dataset", "split"}``.
    A string that is not a corpus name but contains whitespace is taken as the text itself."""
    from .data import canonical_corpus, corpus_rows
    try:
        name = canonical_corpus(dataset)
    except DataError:
        if not any(c.isspace() for c in dataset):
            raise DataError(f"{dataset!r} is neither a corpus name (wikitext2, ptb, c4) nor text; pass text "
                            "containing whitespace, or a valid corpus name.") from None
        return dataset, {"dataset": "text", "chars": len(dataset)}
    split = split or EVAL_SPLIT[name]
    rows = corpus_rows(name, split, data_dir)
    if protocol == "gptq" and name == "c4":
        rows = rows[:1100]
    return PROTOCOLS[protocol]["join"][name].join(rows), {"dataset": name, "split": split}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, dataset: str = "wikitext2", *, seq_len: Optional[int] = None,
               protocol: str = "llm-pruner", bos: str = "none", split: Optional[str] = None,
               batch_size: int = 8, max_chunks: Optional[int] = None, progress: bool = True,
               data_dir=None) -> PerplexityResult:
    """Perplexity of ``model`` on a named corpus (``wikitext2``/``ptb``/``c4``) or a raw text string.

    See the module docstring for the protocols and ``bos`` modes. ``max_chunks`` keeps the first N
    chunks (for quick runs; GPTQ's C4 protocol sets it to 256). Returns ppl, the float64 NLL sum, the
    number of predicted tokens and the exact settings used.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"Unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}.")
    if bos not in BOS_MODES:
        raise DataError(f"Unknown bos mode {bos!r}; valid: {', '.join(BOS_MODES)}.")
    seq_len = int(seq_len or PROTOCOLS[protocol]["seq_len"])
    if seq_len < 2 and bos != "every_chunk":
        raise DataError(f"seq_len={seq_len} leaves nothing to predict; use seq_len >= 2.")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos != "none" and bos_id is None:
        raise DataError(f"bos={bos!r} needs a BOS token but the tokenizer has none; use bos='none'.")
    text, info = corpus_text(dataset, protocol, split, data_dir)
    chunks = _chunks(_encode(tokenizer, text), seq_len, bos, bos_id)
    if max_chunks is None and protocol == "gptq" and info.get("dataset") == "c4":
        max_chunks = 256
    if max_chunks is not None:
        chunks = chunks[: max(1, int(max_chunks))]
    head, hp = _head(model)
    dev = _device(model)
    nll_sum, n_tok = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=chunks.shape[0], desc=f"ppl {info['dataset']}", unit="chunk", disable=not progress)
    for s in range(0, chunks.shape[0], batch_size):
        ids = chunks[s:s + batch_size].to(dev)
        h = head_hidden(model, ids, head=head)[:, :-1]
        tgt = ids[:, 1:].reshape(-1)
        nll = lm_head_nll(h.reshape(-1, h.shape[-1]), hp["weight"], tgt, hp["bias"], hp["softcap"], hp["scale"])
        nll_sum += float(nll.double().sum())
        n_tok += tgt.numel()
        bar.update(ids.shape[0])
        bar.set_postfix(ppl=f"{math.exp(nll_sum / n_tok):.3f}")
    bar.close()
    settings = dict(info, protocol=protocol, seq_len=seq_len, bos=bos, n_chunks=int(chunks.shape[0]),
                    chunk_tokens=int(chunks.shape[1]), batch_size=batch_size, max_chunks=max_chunks,
                    seconds=round(time.perf_counter() - t0, 2))
    return PerplexityResult(ppl=math.exp(nll_sum / n_tok), nll_sum=nll_sum, n_tokens=n_tok, settings=settings)


# ---------------------------------------------------------------- zero-shot
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4 ``_encode_pair``: trailing spaces of the context move to the continuation; the pair
    is tokenised together and the continuation's tokens are those after the context's tokens. An empty
    context becomes the BOS (else EOS) token, as lm-eval's ``prefix_token_id``."""
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
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
    head, hp = _head(model)
    dev = _device(model)
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
    """Zero-shot accuracy, lm-eval-harness 0.4 semantics (prompts: `shortllm.tasks`).

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
                                    "semantics": "lm-eval-harness 0.4 (loglikelihood, target delimiter ' ')"})

