"""Shared helpers of test_evaluate.py / test_tasks.py: a real (tiny) BPE tokenizer and a unigram model."""
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
