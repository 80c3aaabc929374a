"""fuse(): q/k/v and gate/up fused, removed branches dropped; logits equal the unfused pruned model within
the tolerance table, greedy generation identical (with KV cache); fused export + load_fused round trip."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.arch import get_adapter
from shortllm.errors import ModelLoadError, UnsupportedModelError
from shortllm.export import export
from shortllm.fuse import FUSABLE, TOLERANCE, DroppedAttention, DroppedMLP, FusedAttention, fuse, load_fused
from shortllm.plan import make_plan
from shortllm.prune import prune


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
