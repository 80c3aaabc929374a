"""llama.cpp as an outside reader of GGUF files (through the `xllamacpp` CPU wheel, the `gguf-test` extra).

xllamacpp embeds llama.cpp's server. Its completion endpoint reports, with ``n_probs`` and
``post_sampling_probs: false``, the log-probability of each sampled token under the model's RAW distribution
(before any sampler). A logit bias of +100 on the wanted next token makes that token the one sampled, so one
request per position gives log p(x_t | x_<t) computed by llama.cpp itself; the server's prompt cache keeps
the prefix (``swa_full`` so that Gemma-3's sliding-window cache can be reused), so each request evaluates
one new token. The bias changes which token is sampled, never the reported raw log-probability (checked in
the tests against a grammar-forced continuation, which reports the same numbers).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from shortllm.errors import ModelLoadError


def available() -> Optional[str]:
    """None when xllamacpp imports, else why not (for skip messages)."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError as e:
        return f"xllamacpp is not installed ({e}); pip install -e '.[gguf-test]'"
    return None


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (CPU). Use as a context manager, or call close()."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 1024, threads: int = 2):
        import xllamacpp as xl

        path = Path(gguf_path)
        if not path.is_file():
            raise ModelLoadError(f"No GGUF file at {path}")
        p = xl.CommonParams()
        p.model.path = str(path)
        p.n_ctx = int(n_ctx)
        p.n_batch = p.n_ubatch = int(n_ctx)
        p.n_parallel = 1
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(threads)
        p.warmup = False
        p.swa_full = True  # a full-size cache for sliding-window layers: the prompt prefix can be reused
        p.cache_prompt = True
        self.path = path
        self._server = xl.Server(p)

    def close(self) -> None:
        self._server = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _complete(self, body: dict) -> dict:
        out = self._server.handle_completions(body)
        if not isinstance(out, dict) or "error" in out:
            raise RuntimeError(f"llama.cpp completion failed: {out}")
        return out

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 16) -> str:
        """Greedy continuation of ``prompt`` (text, tokenised by llama.cpp, or token ids)."""
        body = {"prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
                "n_predict": int(max_new_tokens), "temperature": 0.0, "top_k": 1, "cache_prompt": False}
        return self._complete(body)["choices"][0]["text"]

    def next_logprob(self, prefix: Sequence[int], target: int) -> Optional[float]:
        """log p(target | prefix) under llama.cpp's raw output distribution; None when the server withholds it
        (a token that is not complete UTF-8 on its own, e.g. one byte of a multi-byte character: the server
        holds such text, and its log-probability, back until the character is complete)."""
        body = {"prompt": [int(t) for t in prefix], "n_predict": 1, "temperature": 0.0, "n_probs": 1,
                "post_sampling_probs": False, "logit_bias": [[int(target), 100.0]], "cache_prompt": True,
                "ignore_eos": True}
        lp = self._complete(body)["choices"][0]["logprobs"]
        if lp is None or not lp.get("content"):
            return None
        c = lp["content"][0]
        if int(c["id"]) != int(target):
            raise RuntimeError(f"llama.cpp sampled token {c['id']} despite the bias towards {target}")
        return float(c["logprob"])

    def sequence_logprobs(self, ids: Sequence[int]) -> list[Optional[float]]:
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids)-1 (None where withheld, see `next_logprob`)."""
        ids = [int(t) for t in ids]
        return [self.next_logprob(ids[:t], ids[t]) for t in range(1, len(ids))]

    def perplexity(self, chunks: Sequence[Sequence[int]], progress: bool = False) -> tuple[float, list[list[bool]]]:
        """(exp(mean NLL), mask): over every predicted token of every chunk (the first token of a chunk is
        context) whose log-probability llama.cpp reports; ``mask[i][t]`` says whether target t+1 of chunk i
        counted (a withheld token is a property of the token, so the mask is the same for every model with
        this vocabulary; compare with `hf_perplexity(model, chunks, mask)`)."""
        from tqdm.auto import tqdm

        nll, n, mask = 0.0, 0, []
        for chunk in tqdm(chunks, desc=f"llama.cpp ppl {self.path.name}", disable=not progress):
            lps = self.sequence_logprobs(chunk)
            mask.append([lp is not None for lp in lps])
            nll -= sum(lp for lp in lps if lp is not None)
            n += sum(mask[-1])
        return math.exp(nll / max(n, 1)), mask


def wikitext2_chunks(tokenizer, n_chunks: int, seq_len: int, bos: bool,
                     data_dir: Optional[str | os.PathLike] = None) -> list[list[int]]:
    """The first ``n_chunks`` non-overlapping ``seq_len``-token chunks of WikiText-2 test (joined with
    "\\n\\n", tokenised without special tokens), each with the BOS id prepended when ``bos`` (Gemma needs BOS at
    every sequence start; SmolLM2 uses none)."""
    from shortllm.data.corpora import load_corpus_text

    text = load_corpus_text("wikitext2", "test", data_dir=data_dir)
    ids = tokenizer(text[: 400 * n_chunks * seq_len], add_special_tokens=False)["input_ids"]
    chunks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n_chunks)]
    if len(chunks[-1]) < seq_len:
        raise ValueError(f"WikiText-2 gave fewer than {n_chunks} x {seq_len} tokens")
    if bos:
        chunks = [[int(tokenizer.bos_token_id)] + c for c in chunks]
    return chunks


def hf_perplexity(model, chunks: Sequence[Sequence[int]], mask: Optional[Sequence[Sequence[bool]]] = None) -> float:
    """The same quantity as `LlamaCpp.perplexity`, from a transformers model (fp32 logits, fp64 sums), over
    the targets ``mask`` keeps (default all)."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            ids = torch.tensor([list(chunk)])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            tok = logp.gather(1, ids[0, 1:, None])[:, 0]
            keep = torch.ones_like(tok, dtype=torch.bool) if mask is None else torch.tensor(mask[i])
            nll -= float(tok[keep].sum())
            n += int(keep.sum())
    return math.exp(nll / n)
