"""fuse(): q/k/v and gate/up fused, removed branches dropped; logits equal the unfused pruned model within
the tolerance table, greedy generation identical (with KV cache); fused export + load_fused round trip."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.errors import ModelLoadError, UnsupportedModelError
from shortllm.model.adapters import get_adapter
from shortllm.pruning.exporting import export
from shortllm.pruning.fusion import (
    CACHE_KWARGS,
    FUSABLE,
    TOLERANCE,
    DroppedAttention,
    DroppedMLP,
    FusedAttention,
    fuse,
    load_fused,
)
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune


def _pruned(arch, dtype=torch.float32, branches=(("attn", 0), ("mlp", 3)), layers=5):
    model = make_tiny(arch, layers, seed=13, dtype=dtype)
    return prune(model, make_plan(None, model=model, blocks=[2], branches=list(branches)))


def _greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0)


@pytest.mark.parametrize("arch", FUSABLE)
def test_fused_equals_unfused(arch):
    pruned = _pruned(arch)  # attention of the FIRST block dropped: cache lengths must still be right
    fused = fuse(pruned)
    ad = get_adapter(fused)
    blocks = ad.blocks()
    assert isinstance(ad.attn(blocks[0]), DroppedAttention) and isinstance(ad.mlp(blocks[2]), DroppedMLP)
    assert isinstance(ad.attn(blocks[1]), FusedAttention)
    assert not hasattr(ad.attn(blocks[1]), "q_proj")
    if arch != "phi3":
        assert hasattr(ad.mlp(blocks[1]), "gate_up_proj") and not hasattr(ad.mlp(blocks[1]), "gate_proj")
    n_unfused = sum(p.numel() for p in pruned.parameters())
    n_fused = sum(p.numel() for p in fused.parameters())
    pad = get_adapter(pruned)
    dropped = (sum(p.numel() for p in pad.attn(pad.blocks()[0]).parameters())
               + sum(p.numel() for p in pad.mlp(pad.blocks()[2]).parameters()))
    assert n_fused < n_unfused and n_unfused - n_fused >= dropped
    batch = random_batch(3, 12, seed=2)
    rtol, atol = TOLERANCE[torch.float32]
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch, use_cache=False).logits, pruned(**batch, use_cache=False).logits,
                                   rtol=rtol, atol=atol)
    ids = batch["input_ids"][:2, :6]  # batch 2, longer than gemma/mistral sliding windows after 8 steps
    assert torch.equal(_greedy(fused, ids), _greedy(pruned, ids)), f"{arch}: fused greedy generation differs"


def _generate_logged(model, batch, n, use_cache):
    """(sequences, raw logits of every step [B, n, V]) of greedy generation."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", FUSABLE)
def test_fused_cached_generation_matches_uncached_oracle(arch):
    """Every step of the fused model's cached generation against the unfused model without any cache.

    The fused attention replaces HF's, so it must find the KV cache under the keyword the running
    transformers passes (`cache=` from 5.24, `past_key_values=` before): one that misses it attends to
    the newest token only, which goes unnoticed at the prompt step and diverges from the next one. The
    dropped attention of block 0 must keep that layer's cache length, which sizes the masks of its
    attention type: left-padded rows show a mask that is too short.
    """
    pruned = _pruned(arch)  # block 0's attention dropped: DroppedAttention must also find the cache
    fused = fuse(pruned)
    n = 10
    b = random_batch(3, 7, seed=11)
    batch = {k: v.flip(1) for k, v in b.items()}  # left-padded; 7 + 10 tokens > the sliding windows of 8
    assert not bool(batch["attention_mask"].all()), "the batch must hold padded rows"
    seq, step_logits = _generate_logged(fused, batch, n, use_cache=True)
    oracle_seq, oracle_logits = _generate_logged(pruned, batch, n, use_cache=False)
    rtol, atol = TOLERANCE[torch.float32]
    for s in range(n):
        torch.testing.assert_close(step_logits[:, s], oracle_logits[:, s], rtol=rtol, atol=atol,
                                   msg=lambda m, s=s: f"{arch}: fused cached logits of step {s} differ: {m}")
    assert torch.equal(seq, oracle_seq), f"{arch}: fused cached generation differs from unfused uncached"
    cached, _ = _generate_logged(pruned, batch, n, use_cache=True)
    assert torch.equal(seq, cached), f"{arch}: fused cached generation differs from unfused cached"


def _attention_calls(model, batch):
    """{layer_idx: (args, kwargs)} of every HF attention module while `model` fills a KV cache."""
    ad = get_adapter(model)
    calls = {}
    handles = [ad.attn(b).register_forward_pre_hook(
        lambda m, args, kw: calls.setdefault(m.layer_idx, (args, dict(kw))), with_kwargs=True) for b in ad.blocks()]
    try:
        with torch.no_grad():
            model(**batch, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return calls


def _split_cache(kwargs):
    """(the keyword the cache came under, the other kwargs)."""
    from transformers.cache_utils import Cache

    names = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    assert len(names) == 1, f"expected the cache under one keyword, got {sorted(kwargs)}"
    return names[0], {k: v for k, v in kwargs.items() if k != names[0]}


@pytest.mark.parametrize("keyword", CACHE_KWARGS)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])  # plain; sliding + softcapped; q/k/v stored fused
def test_fused_attention_takes_the_cache_under_either_keyword(arch, keyword):
    """Each HF attention module's real call (recorded while the model fills a KV cache), replayed into the HF
    module with a fresh cache under the keyword it takes and into the fused module under `keyword`: same
    output, and the same keys and values written into the same cache slot."""
    from transformers.cache_utils import DynamicCache

    model = make_tiny(arch, 2, seed=3)
    ad = get_adapter(model)
    calls = _attention_calls(model, random_batch(2, 12, seed=4, pad=False))  # 12 > gemma2's sliding window
    for i, block in enumerate(ad.blocks()):
        attn = ad.attn(block)
        args, kwargs = calls[i]
        native, rest = _split_cache(kwargs)
        ref_cache, fused_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        with torch.no_grad():
            want = attn(*args, **rest, **{native: ref_cache})[0]
            got = FusedAttention(attn)(*args, **rest, **{keyword: fused_cache})[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert fused_cache.get_seq_length(i) == 12, f"{arch}: the fused attention ignored {keyword}="
        torch.testing.assert_close(fused_cache.layers[i].keys, ref_cache.layers[i].keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_cache.layers[i].values, ref_cache.layers[i].values, rtol=1e-5, atol=1e-5)


def test_fused_attention_refuses_a_cache_under_an_unknown_keyword():
    """A further rename must fail loudly, not generate from a model that silently runs without its cache."""
    from transformers.cache_utils import DynamicCache

    model = make_tiny("llama", 2, seed=3)
    args, kwargs = _attention_calls(model, random_batch(1, 5, seed=4, pad=False))[0]
    _, rest = _split_cache(kwargs)
    fused = FusedAttention(get_adapter(model).attn(get_adapter(model).blocks()[0]))
    with pytest.raises(UnsupportedModelError, match="CACHE_KWARGS"):
        fused(*args, **rest, kv_cache=DynamicCache(config=model.config))
    with pytest.raises(UnsupportedModelError, match="CACHE_KWARGS"):
        DroppedAttention(0)(*args, **rest, kv_cache=DynamicCache(config=model.config))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tolerance_table_other_dtypes(dtype):
    pruned = _pruned("qwen2", dtype=dtype)
    fused = fuse(pruned)
    batch = random_batch(2, 9, seed=5)
    rtol, atol = TOLERANCE[dtype]
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, pruned(**batch).logits, rtol=rtol, atol=atol)


def test_fused_export_round_trip(tmp_path):
    pruned = _pruned("llama", branches=(("attn", 3),))
    fused = fuse(pruned)
    out = export(pruned, tmp_path / "f", fused=True, max_shard_size="40KB")
    assert (out / "fused.safetensors.index.json").exists()
    assert not list(out.glob("model*.safetensors")), "a fused checkpoint must not look like an HF one"
    back = load_fused(out)
    batch = random_batch(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, fused(**batch).logits, rtol=1e-5, atol=1e-5)
    ids = batch["input_ids"][:1, :5]
    assert torch.equal(_greedy(back, ids), _greedy(pruned, ids))
    with pytest.raises(ModelLoadError, match="not a fused"):
        load_fused(tmp_path)


def test_fuse_refuses_unsupported():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        fuse(make_tiny("gpt2", 2))
