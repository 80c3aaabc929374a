"""Corpus perplexity (LLM-Pruner / Shortened-LLaMA and GPTQ protocols).

Perplexity, ``protocol="llm-pruner"`` (LLM-Pruner ``PPLMetric``, reused by Shortened LLaMA
``src/dataset.py``): the split's rows are joined with ``"\\n\\n"`` (WikiText-2 raw **test**, PTB
**validation** -- PTB too is ``"\\n\\n"``-joined there), tokenised ONCE without special tokens, cut into
non-overlapping ``seq_len`` chunks (remainder dropped); PPL = exp(mean NLL over every predicted token).
``bos`` follows Shortened LLaMA's ``add_bos_to_every``, after the BOS policy (`resolve_bos`):

- ``"auto"`` (default): the policy the model's tokenizer requires. A tokenizer that puts BOS in front of
  every text it encodes (Gemma: ``add_bos_token=True``) gets ``"every_chunk"`` -- every chunk is a
  sequence start the model was trained to see after BOS (Gemma-3-270M: WikiText-2 PPL 439 with BOS
  once, 51 with BOS on every chunk). A tokenizer that adds no BOS (SmolLM2, GPT-2) gets ``"none"``:
  exactly what the seed code does with it (it tokenises with the default special tokens).
- ``"none"`` / ``"once"`` on a tokenizer that adds BOS are refused (`DataError`): the numbers would
  measure the model off its input distribution. Every result records the ``bos`` used and why
  (``bos_policy``).

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
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortllm.errors import DataError
from shortllm.evaluation.head import encode_text, head_hidden, lm_head_and_params
from shortllm.model.adapters import model_device
from shortllm.ops import lm_head_nll

PROTOCOLS = {
    # default seq_len and the row join per corpus (GPTQ: PTB and C4 are " "-joined)
    "llm-pruner": {"seq_len": 128, "join": {"wikitext2": "\n\n", "ptb": "\n\n", "c4": "\n\n"}},
    "gptq": {"seq_len": 2048, "join": {"wikitext2": "\n\n", "ptb": " ", "c4": " "}},
}
EVAL_SPLIT = {"wikitext2": "test", "ptb": "validation", "c4": "validation"}
BOS_MODES = ("auto", "none", "once", "every_chunk")


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- BOS policy
def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of a text encoded with its default special
    tokens -- what the model saw at every sequence start in training (Gemma, LLaMA) or not (SmolLM2)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = list(tokenizer("a", verbose=False)["input_ids"])
    return bool(ids) and ids[0] == bos_id


def resolve_bos(tokenizer, bos: str = "auto") -> tuple[str, str]:
    """The BOS mode to run (``none``/``once``/``every_chunk``) and the policy that chose it, for reports.

    ``auto``: ``every_chunk`` if the tokenizer adds BOS, else ``none``. An explicit ``none``/``once`` on a
    tokenizer that adds BOS raises `DataError` (the protocol does not fit that model)."""
    if bos not in BOS_MODES:
        raise DataError(f"Unknown bos mode {bos!r}; valid: {', '.join(BOS_MODES)}.")
    adds = tokenizer_adds_bos(tokenizer)
    if bos == "auto":
        if adds:
            return "every_chunk", "auto: the tokenizer adds BOS, so BOS starts every chunk"
        return "none", "auto: the tokenizer adds no BOS, so chunks are plain token runs (seed protocol)"
    if adds and bos in ("none", "once"):
        raise DataError(f"bos={bos!r} does not fit this model: its tokenizer adds BOS "
                        f"({getattr(tokenizer, 'bos_token', None)!r}) to every sequence, so chunks without it "
                        "are off the model's input distribution. Use bos='auto' (--bos auto) or 'every_chunk'.")
    return bos, f"explicit: bos={bos!r} (the tokenizer {'adds' if adds else 'adds no'} BOS)"


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
    from shortllm.data.corpora import canonical_corpus, corpus_rows
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
               protocol: str = "llm-pruner", bos: str = "auto", split: Optional[str] = None,
               batch_size: int = 8, max_chunks: Optional[int] = None, progress: bool = True,
               data_dir=None) -> PerplexityResult:
    """Perplexity of ``model`` on a named corpus (``wikitext2``/``ptb``/``c4``) or a raw text string.

    See the module docstring for the protocols and ``bos`` modes. ``max_chunks`` keeps the first N
    chunks (for quick runs; GPTQ's C4 protocol sets it to 256). Returns ppl, the float64 NLL sum, the
    number of predicted tokens and the exact settings used.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"Unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}.")
    bos, bos_policy = resolve_bos(tokenizer, bos)
    seq_len = int(seq_len or PROTOCOLS[protocol]["seq_len"])
    if seq_len < 2 and bos != "every_chunk":
        raise DataError(f"seq_len={seq_len} leaves nothing to predict; use seq_len >= 2.")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos != "none" and bos_id is None:
        raise DataError(f"bos={bos!r} needs a BOS token but the tokenizer has none; use bos='none'.")
    text, info = corpus_text(dataset, protocol, split, data_dir)
    chunks = _chunks(encode_text(tokenizer, text), seq_len, bos, bos_id)
    if max_chunks is None and protocol == "gptq" and info.get("dataset") == "c4":
        max_chunks = 256
    if max_chunks is not None:
        chunks = chunks[: max(1, int(max_chunks))]
    head, hp = lm_head_and_params(model)
    dev = model_device(model)
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
    settings = dict(info, protocol=protocol, seq_len=seq_len, bos=bos, bos_policy=bos_policy,
                    n_chunks=int(chunks.shape[0]),
                    chunk_tokens=int(chunks.shape[1]), batch_size=batch_size, max_chunks=max_chunks,
                    seconds=round(time.perf_counter() - t0, 2))
    return PerplexityResult(ppl=math.exp(nll_sum / n_tok), nll_sum=nll_sum, n_tokens=n_tok, settings=settings)
