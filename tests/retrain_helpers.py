"""Shared by the retraining tests and their torchrun workers: a character tokenizer and a toy corpus."""
from __future__ import annotations

import random

_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,\n#:!?'-")


def char_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny models' 128-token vocab."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(_CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def toy_corpus(n_sentences: int = 400, seed: int = 0) -> str:
    """Sentences from a tiny grammar: far more predictable than a random model's uniform guess."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the bird", "my fish"]
    verb, obj = ["sat on", "ran to", "saw"], ["the mat", "a tree", "the sea"]
    return "\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n_sentences))


def ddp_run(spec_path: str) -> None:
    """torchrun worker: one retraining run; rank 0 writes its losses and final weights."""
    import json

    import torch
    from safetensors.torch import save_file
    from tiny_models import make_tiny

    from shortllm.retrain.config import RetrainConfig
    from shortllm.retrain.train_data import text_data
    from shortllm.retrain.training import retrain_model

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(1)
    tok = char_tokenizer()
    data = text_data(toy_corpus(), tok, 32, 0.1)
    r = retrain_model(make_tiny("llama"), tok, data, RetrainConfig(**spec["cfg"]), progress=False)
    if torch.distributed.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in r.model.state_dict().items()}, spec["weights"])
        with open(spec["out"], "w") as f:
            json.dump({"losses": r.losses, "world_size": r.world_size, "steps": r.steps_done,
                       "tokens_seen": r.tokens_seen, "parallel": r.parallel,
                       "param_types": sorted({type(p).__name__ for p in r.model.parameters()})}, f)


if __name__ == "__main__":
    import sys

    ddp_run(sys.argv[1])
