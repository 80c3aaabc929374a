"""Tiny random Hugging Face models of every supported architecture, built in code (no download).

Liger-style: every architecture gets an end-to-end test on a config small enough for CPU.
"""
from __future__ import annotations

import torch
import transformers as tf

# model_type -> (config class name, model class name, extra config kwargs)
_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
                     "final_logit_softcapping": 30.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}

TINY_ARCHS = tuple(_SPECS)
# name -> (model_type, config overrides): layouts of a supported architecture that take other code paths.
# Kept out of TINY_ARCHS because the every-architecture tests remove branches, which these refuse.
VARIANTS = {
    # opt-350m: post-layer-norm blocks, no final LayerNorm (final_layer_norm is None), and a word embedding
    # narrower than the blocks, so project_in / project_out exist
    "opt_post_ln": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
}
VOCAB = 128


def tiny_config(model_type: str, num_layers: int = 4, **overrides):
    if model_type in VARIANTS:
        model_type, variant = VARIANTS[model_type]
        overrides = {**variant, **overrides}
    cfg_name, _, extra = _SPECS[model_type]
    cfg_cls = getattr(tf, cfg_name)
    if model_type == "gpt2":
        kw = dict(n_layer=num_layers, n_embd=64, n_head=4, n_positions=256, vocab_size=VOCAB)
    elif model_type == "opt":
        kw = dict(num_hidden_layers=num_layers, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                  max_position_embeddings=256, vocab_size=VOCAB, word_embed_proj_dim=64)
    else:
        kw = dict(num_hidden_layers=num_layers, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, max_position_embeddings=256, vocab_size=VOCAB)
        if model_type != "gpt_neox":
            kw["num_key_value_heads"] = 2
    kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(extra)
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def make_tiny(model_type: str, num_layers: int = 4, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM of `model_type` (or of a VARIANTS name), in eval mode.

    Norm weights are perturbed away from their init (ones/zeros) so tests that rely on them
    (Mag, Taylor) see non-trivial values.
    """
    _, model_name, _ = _SPECS[VARIANTS[model_type][0] if model_type in VARIANTS else model_type]
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(tiny_config(model_type, num_layers, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def random_batch(batch: int = 3, seq: int = 17, seed: int = 1, pad: bool = True, vocab: int = VOCAB):
    """input_ids + right-padded attention_mask (rows of different lengths when pad=True)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):
            n = max(2, seq - 3 * b)
            mask[b, n:] = 0
            ids[b, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}
