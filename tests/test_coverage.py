"""Every decoder-only model type of transformers' causal-LM mapping, built tiny in code, end to end.

For each type: a tiny random config is built from the config class's own keyword arguments (shrunk by
`TINY` where the class takes them), the model goes through `get_adapter` (the registry, else discovery),
`score_fast` (bi, angular, taylor, mag, ppl), a plan removing one middle block, `prune`, and
`save_pretrained` -> plain `from_pretrained`. The oracle is independent of shortllm's pruning code: a deep
copy of the unpruned model with the block deleted from its layer list by hand and the config layer count
lowered. Types that cannot be built tiny or fail for an understood reason are in EXCLUDED, with the reason;
`test_every_type_is_covered_or_excluded` keeps the table honest as transformers adds types.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers as tf
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from shortllm.model.adapters import REGISTRY, get_adapter
from shortllm.model.discovery import layer_count
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune
from shortllm.scoring.engine import score_fast

VOCAB = 128
LAYERS = 4
MAX_PARAMS = 3_000_000  # a type whose generic tiny config is still bigger than this is not "tiny"

# keyword arguments a config class takes under any of these names are shrunk to these values
TINY = {
    "vocab_size": VOCAB, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "kv_channels": 16,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
# per-type corrections where a generic value breaks one class's own constraints
OVERRIDES: dict[str, dict] = {}

# type -> why it is not run end to end. Categories (the text before ":") feed benchmarks/coverage_table.py.
EXCLUDED: dict[str, str] = {}

MOE_WORDS = ("moe", "mixtral", "dbrx", "jetmoe", "deepseek", "gpt_oss", "phimoe", "jamba", "minimax",
             "granitemoe", "olmoe", "ernie4_5_moe", "hunyuan_v1_moe", "qwen3_next", "llama4", "dots1", "longcat",
             "glm4_moe", "afmoe", "bailing", "flex_olmo", "laguna", "sarvam_moe", "exaone_moe")
SSM_WORDS = ("mamba", "jamba", "zamba", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "lfm2",
             "recurrent_gemma", "rwkv", "xlstm", "qwen3_next", "kimi_linear", "olmo_hybrid", "bailing_hybrid",
             "minimax", "qwen3_5")


def all_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_moe(model_type: str) -> bool:
    return any(w in model_type for w in MOE_WORDS)


def is_ssm_hybrid(model_type: str) -> bool:
    return any(w in model_type for w in SSM_WORDS)


def tiny_config(model_type: str):
    """The type's config class with every TINY keyword its __init__ accepts, plus OVERRIDES."""
    cls = CONFIG_MAPPING[model_type]
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in TINY.items() if k in params}
    kw.update(OVERRIDES.get(model_type, {}))
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def model_class(model_type: str):
    return getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def build(model_type: str, seed: int = 0):
    cfg = tiny_config(model_type)
    cls = model_class(model_type)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(copy.deepcopy(cfg)).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"tiny config still has {n} parameters")
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        # norms start at ones/zeros; perturbed so a wrongly placed final norm changes the logits
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(seed: int = 1, rows: int = 2, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def oracle_without(model, block: int):
    """The unpruned model with `block` deleted by hand: its layer list and the config's layer count only."""
    ref = copy.deepcopy(model)
    ad = get_adapter(model)
    parent_path, _, name = ad.spec.blocks.rpartition(".")
    parent = ref.get_submodule(parent_path) if parent_path else ref
    layers = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList([m for i, m in enumerate(layers) if i != block]))
    key, n = layer_count(ref.config)
    setattr(ref.config, key, n - 1)
    return ref


def greedy(model, ids, cache: bool, n: int = 4):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=cache, pad_token_id=0)


def logits(model, b):
    with torch.no_grad():
        return model(**b, use_cache=False).logits


def end_to_end(model_type: str, out_dir) -> None:
    model = build(model_type)
    ad = get_adapter(model)
    L = ad.num_layers
    assert L == LAYERS
    b = batch()
    scores = score_fast(model, [b], metrics=("bi", "angular", "taylor", "mag", "ppl"), progress=False)
    for m in ("bi", "taylor", "mag", "ppl"):
        v = scores.per_block(m)
        assert v.shape == (L,) and torch.isfinite(v).all(), f"{model_type}: {m} = {v}"
    ang = scores.values["angular"]
    assert ang.shape[1] == L and torch.isfinite(ang[0]).all()
    drop = L // 2
    plan = make_plan(None, model=model, blocks=[drop])
    oracle = oracle_without(model, drop)
    pruned = prune(model, plan, inplace=False)
    got = logits(pruned, b)
    torch.testing.assert_close(got, logits(oracle, b), rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(out_dir)
    back = tf.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert layer_count(back.config)[1] == L - 1
    torch.testing.assert_close(logits(back, b), got, rtol=1e-5, atol=1e-5)
    ids = b["input_ids"][:1, :5]
    assert torch.equal(greedy(back, ids, True), greedy(back, ids, False)), f"{model_type}: KV cache broken"


COVERED = [t for t in all_types() if t not in EXCLUDED]


@pytest.mark.parametrize("model_type", COVERED)
def test_end_to_end(model_type, tmp_path):
    end_to_end(model_type, tmp_path / model_type)


def test_every_type_is_covered_or_excluded():
    assert set(COVERED) | set(EXCLUDED) == set(all_types())
    for t, why in EXCLUDED.items():
        assert ":" in why and why.split(":", 1)[1].strip(), f"{t}: exclusion without a reason"
    # the registry's own types must stay covered: excluding one would hide a regression
    assert not set(REGISTRY) & set(EXCLUDED)
