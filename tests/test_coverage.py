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
from shortllm.model.layer_config import layer_count
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune
from shortllm.scoring.engine import score_fast
from shortllm.scoring.search import iterative, subblock

VOCAB = 128
LAYERS = 4
MAX_PARAMS = 4_000_000  # a type whose generic tiny config is still bigger than this is not "tiny"

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
    "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "rotary_dim": 8, "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
# per-type corrections where a generic value breaks one class's own constraints
OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 2]]},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "ernie4_5_moe": {"moe_k": 2},
    "dots3_note_text": {"num_key_value_heads": 4},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "plbart": {"decoder_attention_heads": 4},
    "zaya": {"num_experts_per_tok": 1},
    # xLSTM's cache allocates square [head_dim, head_dim] states: q/k must be as wide as v for cached generation
    "xlstm": {"qk_dim_factor": 1.0},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"] * 2, "num_dense_layers": 1},
    # hybrids whose default attention layers all lie beyond 4 layers: without one attention block
    # transformers' own cached generation fails; [1, 3] also exercises index-list remapping in prune
    "bamba": {"attn_layer_indices": [1, 3]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},
    # Jamba derives its attention / MoE layers from period + offset (properties, not stored lists): a pattern the
    # removal of block 2 keeps (attention at 1 of 4, every block MoE); a removal that breaks the pattern is a
    # PlanError (tests/test_discovery_bad_input.py)
    "jamba": {"attn_layer_period": 4, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
}

# type -> why it is not run end to end. Categories (the text before ":") feed benchmarks/coverage_table.py.
_ENC = "encoder family: a BERT-style encoder whose causal head is a decoder mode of an encoder model"
_ENCDEC = "encoder-decoder: the causal-LM class is the decoder of a seq2seq model (refused like today)"
_MM_TINY = ("multimodal wrapper: not tiny: a vision/audio tower the generic tower kwargs cannot shrink below the "
            "size limit")
_BIG = "not tiny: the class's own kwargs cannot shrink it below the size limit (nested or fixed dimensions)"
_NOEXPRESS = ("checkpoint cannot express the pruned model: the reloaded model differs from the pruned one, "
              "because blocks rebuild a depth-dependent constant from their index or a config pattern")
_UPSTREAM_GEN = ("upstream: transformers' cached generation fails on the UNPRUNED tiny model (no attention "
                 "layer among the first blocks)")
EXCLUDED: dict[str, str] = {
    **{t: _ENC for t in ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
                         "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
                         "xlm-roberta", "xlm-roberta-xl", "xmod", "xlm")},
    "reformer": "encoder family: chunked / LSH reversible layers, is_decoder mode of an encoder architecture",
    "xlnet": "encoder family: permutation LM with two streams and a [T, B, D] layout",
    **{t: _ENCDEC for t in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
                            "pegasus", "plbart", "prophetnet", "whisper", "trocr", "musicgen", "musicgen_melody")},
    **{t: _MM_TINY for t in ("gemma4", "git", "phi4_multimodal")},
    "gemma3n": "multimodal wrapper: needs the optional timm library for its vision tower (not installed in CI)",
    "dots3_note": "tiny config does not build: its default per_layer_config names layers 25-41",
    "gemma4_unified": "tiny config does not build: its default per_layer_config names layer 3 of 3",
    "gemma4_unified_assistant": "not standalone: the forward needs another model's inputs_embeds and shared KV "
                                "states",
    "llama4": "base model not found: the causal-LM class for this type is Llama4ForCausalLM (as llama4_text); "
              "Llama4ForConditionalGeneration's own forward raises AttributeError ('image_outputs') on any input "
              "in this transformers release",
    "mllama": "blocks not a chain: cross-attention layers are skipped without image inputs, so text-only "
              "calibration does not run every block",
    "qwen4_exp": "tiny config does not build: sizes the generic kwargs leave None",
    **{t: _BIG for t in ("blt", "cpmant", "ctrl", "dots3_note_text", "gemma3n_text", "gemma4_text", "inkling_text",
                         "inkling2_text", "inkling2_loop_text", "kimi_linear", "longcat_flash")},
    "dory": "recurrent depth: the blocks do not each run once in order (looped), so a block is not a removable unit",
    "hrm_text": "recurrent depth: two block lists run in loops (hierarchical reasoning), no single block chain",
    "deepseek_v4": "multi-stream residual (hyper-connections): hc_head mixes streams after the last block",
    "hy_v4": "multi-stream residual (hyper-connections): hc_head mixes streams after the last block",
    "modernbert-decoder": "head outside the base model: a dense + norm prediction head runs between "
                          "model.base_model and the decoder, which the scorer's loss would skip",
    "minicpm3": "head transform not reproduced: logits are scaled by a width ratio that head_params does not know",
    "beam": _NOEXPRESS + " (depth-scaled residual: every block scales the residual stream by "
                          "sqrt((k-1)/k), k = 2 * (layer_idx + 1), so a renumbered block rescales the stream)",
    "gemma4_unified_text": "heterogeneous config: per_layer_config, which prune refuses (PlanError)",
    "recurrent_gemma": "not deep-copyable: weight_norm parameters are not graph leaves (prune(inplace=False) and "
                       "the oracle both deepcopy)",
    "nemotron_h": _UPSTREAM_GEN,
    "bailing_hybrid": _UPSTREAM_GEN,
    "llama4_text": "base model not found: base_model_prefix 'language_model' names no submodule, so "
                   "model.base_model (which the scorer runs for the LM head's input) is the causal LM itself",
    "cohere_compass_text": "tiny config does not build: KeyError 'full_attention' inside the model's __init__",
    "dbrx": "tiny config does not build: nested attn_config / ffn_config are not shrunk by the generic kwargs",
    "qwen4_exp_text": "tiny config does not build: sizes the generic kwargs leave None",
    "zamba": "tiny config does not build: its shared-block weight tying expects the default layer layout",
    "zamba2": "tiny config does not build: layer_types has a fixed length of 54",
    "gemma4_assistant": "tiny config does not build: validation of hidden_size_per_layer_input",
}

# classified from the built model's module classes, not from the type's name
_MOE_CLASS_WORDS = ("moe", "expert", "sparse")
_SSM_CLASS_WORDS = ("mamba", "mixer", "linearattention", "gateddelta", "deltanet", "rwkv", "xlstm", "mlstm",
                    "recurrent", "shortconv", "lightning", "lfm2", "hybrid")


def _class_names(model) -> set[str]:
    return {type(m).__name__.lower() for m in model.modules()}


def is_moe(model) -> bool:
    return any(w in n for n in _class_names(model) for w in _MOE_CLASS_WORDS)


def is_ssm_hybrid(model) -> bool:
    return any(w in n for n in _class_names(model) for w in _SSM_CLASS_WORDS)


def all_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# a multimodal wrapper's non-text towers (vision, audio, VQ) are shrunk to these
TINY_TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "depth": 1, "num_layers": 1,
              "num_attention_heads": 2, "num_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
              "image_size": 28, "patch_size": 14, "out_hidden_size": TINY["hidden_size"]}


def _tiny_kwargs(cls, table: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in table.items() if k in params}
    if "kv_lora_rank" in params:
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # MLA expands its latent to every head
    return kw


def tiny_config(model_type: str):
    """The type's config class with every TINY keyword its __init__ accepts, plus OVERRIDES. A wrapper's
    sub-configs (`sub_configs`: text_config with TINY, vision/audio towers with TINY_TOWER) are built tiny too."""
    cls = CONFIG_MAPPING[model_type]
    kw = _tiny_kwargs(cls, TINY)
    subs = getattr(cls, "sub_configs", None) or {}
    if subs and not any(k in kw for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")):
        default = cls()
        for name in subs:
            sub = getattr(default, name, None)
            if sub is None or isinstance(sub, dict):
                continue
            table = TINY if name == "text_config" else TINY_TOWER
            kw[name] = type(sub)(**_tiny_kwargs(type(sub), table))
    kw.update(OVERRIDES.get(model_type, {}))
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    for name in subs:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = "eager"
    return cfg


def model_class(model_type: str):
    return getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def build(model_type: str, seed: int = 0):
    cfg = tiny_config(model_type)
    cls = model_class(model_type)
    want = getattr(cls, "config_class", None)
    sub = getattr(cfg, "text_config", None)
    if want is not None and not isinstance(cfg, want) and isinstance(sub, want):
        cfg = sub  # the type's causal-LM class is the text model of a multimodal config (Qwen3.5, Emu3)
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
    cfg = text_config(ref.config)
    key, n = layer_count(cfg)
    setattr(cfg, key, n - 1)
    # hybrid models pick each block's mask from config.layer_types by position at run time, so the list
    # the forward reads must lose the deleted entry too (written out here, not through shortllm)
    if getattr(cfg, "attn_layer_indices", None):  # Bamba derives its layer types from this index list
        cfg.attn_layer_indices = [i - (i > block) for i in cfg.attn_layer_indices if i != block]
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n and "layer_types" in cfg.to_dict():
        cfg.layer_types = [t for i, t in enumerate(types) if i != block]
    return ref


def text_config(cfg):
    """A multimodal wrapper's language-model config (its `text_config`), else the config itself."""
    sub = getattr(cfg, "text_config", None)
    return sub if sub is not None and getattr(sub, "num_hidden_layers", None) else cfg


# MoE types whose experts are not a routed-experts call (forward(hidden, indices, weights)): no REAP statistics
NO_EXPERT_STATS = {"jetmoe": "JetMoE's ParallelExperts take (inputs, expert_size) of pre-sorted tokens, not the "
                             "router's selection"}


def check_expert_statistics(model_type: str, model, scores, n_tokens: int) -> None:
    """Every MoE type (but NO_EXPERT_STATS) gets per-expert statistics from the scoring pass: each MoE layer's
    counts add up to k routed experts per valid token, with finite, non-negative REAP sums."""
    if not is_moe(model) or model_type in NO_EXPERT_STATS:
        assert model_type not in NO_EXPERT_STATS or not scores.experts, f"{model_type}: now has statistics"
        return
    assert scores.experts, f"{model_type}: an MoE model without per-expert statistics"
    for i, d in scores.experts.items():
        total = float(d["count"].sum())
        assert total > 0 and total % n_tokens == 0, f"{model_type} layer {i}: {total} routings of {n_tokens} tokens"
        assert torch.isfinite(d["reap_sum"]).all() and (d["reap_sum"] >= 0).all(), f"{model_type}: {d}"


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
    check_expert_statistics(model_type, model, scores, int(b["attention_mask"].sum()))
    drop = L // 2
    plan = make_plan(None, model=model, blocks=[drop])
    oracle = oracle_without(model, drop)
    pruned = prune(model, plan, inplace=False)
    got = logits(pruned, b)
    torch.testing.assert_close(got, logits(oracle, b), rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(out_dir)
    # a text model built from a multimodal type's text_config (emu3_text) may have no Auto mapping of its own
    loader = tf.AutoModelForCausalLM if model.config.model_type == model_type else type(model)
    back = loader.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(back) is type(model) and layer_count(text_config(back.config))[1] == L - 1
    torch.testing.assert_close(logits(back, b), got, rtol=1e-5, atol=1e-5)
    ids = b["input_ids"][:1, :5]
    assert torch.equal(greedy(back, ids, True), greedy(back, ids, False)), f"{model_type}: KV cache broken"
    # PPL and the SLEB search against the physically pruned model: exp(mean NLL) of the oracle's logits
    ref_ppl = ppl_of(logits(oracle, b), b)
    torch.testing.assert_close(scores.per_block("ppl")[drop], ref_ppl, rtol=1e-3, atol=0)
    sleb = iterative(model, [b], 1, progress=False)
    torch.testing.assert_close(torch.tensor(sleb.candidate_ppl[0][str(drop)], dtype=torch.float64), ref_ppl,
                               rtol=1e-3, atol=0)
    assert sleb.order[0] == scores.ranking("ppl")[0], f"{model_type}: SLEB and the ppl metric disagree"
    if has_branches(ad):
        check_subblock(model_type, model, b, out_dir)


def ppl_of(lg, b) -> torch.Tensor:
    lg = lg.double()
    nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), b["input_ids"][:, 1:].reshape(-1))
    return torch.exp(nll)


def has_branches(ad) -> bool:
    """Every block has an attention and an MLP output projection (removing a branch = zeroing it)."""
    return not ad.post_norm_blocks and all(ad.attn_out(blk) is not None and ad.mlp_out(blk) is not None
                                           for blk in ad.blocks())


def without_branch(model, kind: str, block: int):
    """The oracle of a removed branch (BlockPruner): a copy whose branch module contributes zeros."""
    ref = copy.deepcopy(model)
    ad = get_adapter(ref)
    mod = ad.attn(ad.blocks()[block]) if kind == "attn" else ad.mlp(ad.blocks()[block])

    def zero(_m, _a, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]),) + out[1:]
        return torch.zeros_like(out)
    mod.register_forward_hook(zero)
    return ref


def check_subblock(model_type: str, model, b, out_dir) -> None:
    """The sub-block search's first pick, its PPL against the branch-zeroed oracle, and its export."""
    res = subblock(model, [b], 1, progress=False)
    kind, blk = res.plan[0]
    ref = logits(without_branch(model, kind, blk), b)
    torch.testing.assert_close(torch.tensor(res.ppl_after_each_step[0], dtype=torch.float64), ppl_of(ref, b),
                               rtol=1e-3, atol=0)
    pruned = prune(model, make_plan(None, model=model, branches=[(kind, blk)]), inplace=False)
    torch.testing.assert_close(logits(pruned, b), ref, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(f"{out_dir}-branch")
    loader = tf.AutoModelForCausalLM if model.config.model_type == model_type else type(model)
    back = loader.from_pretrained(f"{out_dir}-branch", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, b), ref, rtol=1e-5, atol=1e-5)


COVERED = [t for t in all_types() if t not in EXCLUDED]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: thread start-up and contention on shared cores cost ~50x the compute
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("model_type", COVERED)
def test_end_to_end(model_type, tmp_path):
    end_to_end(model_type, tmp_path / model_type)


def test_every_type_is_covered_or_excluded():
    assert set(COVERED) | set(EXCLUDED) == set(all_types())
    for t, why in EXCLUDED.items():
        assert ":" in why and why.split(":", 1)[1].strip(), f"{t}: exclusion without a reason"
    # the registry's own types must stay covered: excluding one would hide a regression
    assert not set(REGISTRY) & set(EXCLUDED)


def test_diffllama_blocks_renumbered_by_two_keep_their_function(tmp_path):
    """DiffLlama derives lambda_init from the layer index: removing blocks 0 and 1 renumbers blocks 2, 3 to 0, 1,
    whose reloaded constants differ; prune absorbs the difference into the weights (o_proj, lambda_q)."""
    model = build("diffllama")
    b = batch()
    pruned = prune(model, make_plan(None, model=model, blocks=[0, 1]), inplace=False)
    ref = oracle_without(oracle_without(model, 1), 0)
    torch.testing.assert_close(logits(pruned, b), logits(ref, b), rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path / "d")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, b), logits(ref, b), rtol=1e-5, atol=1e-5)
