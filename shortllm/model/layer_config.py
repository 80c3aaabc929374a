"""Config entries that depend on the depth: the layer count, lists with one entry per layer, lists of
layer indices. Discovery reads them to size a model; pruning rewrites them for the kept blocks.
"""
from __future__ import annotations

from shortllm.errors import UnsupportedModelError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "num_blocks")


def override_hint(part: str) -> str:
    """How to name a part discovery could not find (the end of every such error message)."""
    return (f"pass it yourself: get_adapter(model, {part}=...) (dotted path from the *ForCausalLM module; "
            "also blocks=, final_norm=, embeddings=, lm_head=, attn=, mlp=, attn_out=, mlp_out=), or "
            "shortllm.model.adapters.register(model_type, ArchSpec(...))")


SUB_CONFIGS = ("text_config", "language_config", "llm_config", "decoder_config")


def depth_config(cfg) -> tuple[str, object]:
    """(attribute path, config) of the config that holds the decoder's depth: the config itself, or for a
    multimodal wrapper (Gemma-3, Qwen2.5-VL `...ForConditionalGeneration`) the language model's sub-config
    (`text_config`), which the language model's modules share, so rewriting it rewrites what they read."""
    if _has_count(cfg):
        return "", cfg
    for name in SUB_CONFIGS:
        sub = getattr(cfg, name, None)
        if sub is not None and not isinstance(sub, dict) and _has_count(sub):
            return name, sub
    return "", cfg


def _has_count(cfg) -> bool:
    return any(isinstance(getattr(cfg, k, None), int) and not isinstance(getattr(cfg, k), bool)
               and getattr(cfg, k) > 0 for k in LAYER_COUNT_KEYS)


def layer_count(cfg) -> tuple[str, int]:
    """(the config attribute that holds the layer count, its value). Aliases (GPT-2's `num_hidden_layers`
    -> `n_layer`) resolve to the attribute the config really stores, which is what save_pretrained writes."""
    amap = getattr(cfg, "attribute_map", {}) or {}
    for key in LAYER_COUNT_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return amap.get(key, key), v
    raise UnsupportedModelError(
        f"model_type={getattr(cfg, 'model_type', '')!r}: the config has no layer count "
        f"({', '.join(LAYER_COUNT_KEYS)}), nor has a sub-config ({', '.join(SUB_CONFIGS)}) that does; "
        + override_hint("blocks"))


# config lists of length L that are not one-entry-per-layer facts
NON_LAYER_LISTS = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                             "forced_decoder_ids", "eos_token_id", "bos_token_id", "pad_token_id", "label2id",
                             "id2label", "tie_word_embeddings"})


def _index_list_name(k: str) -> bool:
    k = k.lower()
    return (k.endswith("_layers") or "layer_ids" in k or "layers_idx" in k or "layer_idx" in k
            or "layer_indices" in k or "layers_block_type_idx" in k or k.endswith("_layer_ids"))


def index_lists(cfg, L: int) -> list[str]:
    """Config entries that list layer INDICES (`mlp_only_layers`, attention-layer index lists): non-empty
    lists of ints in [0, L) under an index-like name. Checked before `per_layer_lists` so that an index
    list that happens to have L entries is remapped, not filtered."""
    out = []
    for k, v in _items(cfg):
        if (isinstance(v, (list, tuple)) and v and _index_list_name(k)
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < L for x in v)
                and len(set(v)) == len(v)):
            out.append(k)
    return out


def per_layer_lists(cfg, L: int) -> tuple[str, ...]:
    """Config entries holding one value per layer: lists / tuples of length L (sub-configs such as
    `text_config` and known non-layer lists excluded; index lists excluded, they are remapped instead)."""
    idx = set(index_lists(cfg, L))
    return tuple(k for k, v in _items(cfg)
                 if isinstance(v, (list, tuple)) and len(v) == L and k not in NON_LAYER_LISTS and k not in idx)


def _items(cfg):
    # to_dict() already renders nested sub-configs as dicts, which the list checks skip
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return [(k, v) for k, v in d.items() if not k.startswith("_")]


def derived_layer_lists(cfg, L: int) -> dict[str, list]:
    """Per-layer lists a config COMPUTES instead of storing (properties, e.g. Jamba's `layers_block_type` from
    attn_layer_period/offset): nothing in the saved config.json holds them, so a depth change must leave each of
    them equal to its kept entries, or the reloaded model builds other blocks. name -> current value."""
    from transformers import PretrainedConfig

    stored = set(cfg.to_dict()) if hasattr(cfg, "to_dict") else set()
    out = {}
    for name in dir(type(cfg)):
        if name.startswith("_") or name in stored or not isinstance(getattr(type(cfg), name, None), property):
            continue
        if getattr(type(cfg), name) is getattr(PretrainedConfig, name, None):
            # transformers' own (torch_dtype, use_return_dict, ...): never per-layer, and reading the deprecated
            # aliases logs a deprecation warning the user did not cause
            continue
        try:
            v = getattr(cfg, name)
        except Exception:  # noqa: BLE001 - a property that cannot be computed for this config is not a layer list
            continue
        if isinstance(v, (list, tuple)) and len(v) == L:
            out[name] = list(v)
    return out


def stored_count_keys(cfg, L: int) -> list[str]:
    """Every layer-count key the config STORES with value L: some configs keep two (xLSTM's num_hidden_layers
    and num_blocks, the model reads the second), and a depth change must rewrite all of them."""
    stored = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    return [k for k in LAYER_COUNT_KEYS if stored.get(k) == L and not isinstance(stored.get(k), bool)]
