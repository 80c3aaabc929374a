"""Shared helpers of the evaluation tests: a real (tiny) BPE tokenizer, a unigram model, and the plain-forward
log-likelihood oracle of lm-eval's zero-shot scores."""
from __future__ import annotations

import torch

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A good answer is better than a bad answer. "
    "Question: which one is good? Answer: the good one, not the bad one. Sarah was a much better "
    "surgeon than Maria so she always got the harder cases. He is ripping level tiles off the roof. "
) * 20


def make_bpe_tokenizer(vocab_size: int = 128):
    """A trained byte-pair tokenizer with real merges (so joint vs separate tokenisation can differ)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  limit_alphabet=70)
    tk.train_from_iterator([_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_unigram_gpt2(logits: torch.Tensor):
    """A tiny GPT-2 whose next-token distribution is softmax(`logits`) at EVERY position.

    ln_f's weight is zeroed and its bias set to e_0, so the LM head always sees e_0 and emits column 0
    of the (tied) embedding matrix, which we set to `logits`. Log-likelihoods are then known exactly.
    """
    from tiny_models import make_tiny

    model = make_tiny("gpt2", num_layers=2, dtype=torch.float64)
    with torch.no_grad():
        ln = model.transformer.ln_f
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 1.0
        model.lm_head.weight[:, 0] = logits.to(torch.float64)
    return model


def ref_loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain full-logit forward, float64 log-softmax: the oracle of
    lm-eval's scores. The pair is tokenised together (the tokenizer's default special tokens) and the
    continuation is what follows the context's own tokens; the window keeps the last max_length + 1 tokens
    (lm-eval 0.4's left truncation)."""
    assert context and context == context.rstrip(), "the tasks' contexts never end in whitespace"
    whole = list(tok(context + continuation)["input_ids"])
    n_ctx = len(tok(context)["input_ids"])
    assert len(whole) > n_ctx, (context, continuation)
    n_cont = len(whole) - n_ctx
    window = whole[-(model.config.max_position_embeddings + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([window[:-1]])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(window[1:])
    return float(logp[torch.arange(len(targets)), targets][-n_cont:].sum())


def ref_task_scores(model, tok, items) -> dict:
    """acc / acc_norm of `shortllm.data.tasks.MCItem`s from `ref_loglik` (argmax, first index among ties;
    acc_norm divides by the choice's length in characters, as lm-eval's completion_len), with the lls."""
    lls, correct, correct_n = [], 0, 0
    for it in items:
        ll = [ref_loglik(model, tok, c, k) for c, k in zip(it.contexts, it.continuations)]
        norm = [x / len(ch) for x, ch in zip(ll, it.choices)]
        correct += max(range(len(ll)), key=lambda i: (ll[i], -i)) == it.gold
        correct_n += max(range(len(norm)), key=lambda i: (norm[i], -i)) == it.gold
        lls.append(ll)
    return {"acc": correct / len(items), "acc_norm": correct_n / len(items), "lls": lls}
