"""prune(): every architecture; logits equal the original model with the removed blocks bypassed (float64),
config rewritten, layer_idx renumbered, cached generation == uncached generation."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import TINY_ARCHS, make_tiny, random_batch

from shortllm.errors import PlanError
from shortllm.model.adapters import get_adapter
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune


def reference_logits(model, plan, batch):
    """The unpruned model with removed blocks turned into identities and removed branches zeroed, by hooks."""
    ad = get_adapter(model)
    blocks = ad.blocks()
    handles = []

    def skip(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def zero(mod, args, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    for i in plan.removed:
        handles.append(blocks[i].register_forward_hook(skip, with_kwargs=True))
    for kind, i in plan.removed_branches:
        handles.append(ad.branch(blocks[i], kind).register_forward_hook(zero))
    try:
        with torch.no_grad():
            return model(**batch, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def greedy(model, ids, n=6, cache=True):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prune_every_arch(arch):
    model = make_tiny(arch, 5, seed=11, dtype=torch.float64)
    batch = random_batch(2, 11, seed=4)
    plan = make_plan(None, model=model, blocks=[0, 3], branches=[("attn", 1), ("mlp", 4)])
    ref = reference_logits(model, plan, batch)
    pruned = prune(model, plan, inplace=False)
    assert get_adapter(model).num_layers == 5, "inplace=False must leave the original model alone"
    ad = get_adapter(pruned)
    assert ad.num_layers == 3 and type(pruned) is type(model)
    assert pruned.config.num_hidden_layers == 3
    for new, block in enumerate(ad.blocks()):
        idx = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idx == {new}, f"{arch}: block {new} still carries layer_idx {idx}"
    types = getattr(pruned.config, "layer_types", None)
    if types is not None:
        orig = model.config.layer_types
        assert list(types) == [orig[i] for i in plan.kept]
    with torch.no_grad():
        got = pruned(**batch, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # a removed branch is a zeroed output projection (weight and bias)
    attn_out = ad.attn_out(ad.blocks()[plan.new_index[1]])
    assert not attn_out.weight.any() and (getattr(attn_out, "bias", None) is None or not attn_out.bias.any())
    ids = batch["input_ids"][:1, :7]
    assert torch.equal(greedy(pruned, ids, cache=True), greedy(pruned, ids, cache=False)), f"{arch}: KV cache broken"
    assert pruned.shortllm_plan is plan
    with pytest.raises(PlanError, match="already pruned"):
        prune(pruned, plan)


def test_qwen2_max_window_layers_keeps_each_blocks_attention_type():
    model = make_tiny("qwen2", 6, max_window_layers=3, sliding_window=4)
    old_types = list(model.config.layer_types)
    assert old_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    plan = make_plan(None, model=model, blocks=[0, 4])
    pruned = prune(model, plan, inplace=False)
    cfg = pruned.config
    assert cfg.max_window_layers == 2 and cfg.num_hidden_layers == 4
    assert list(cfg.layer_types) == [old_types[i] for i in plan.kept]
    # the threshold alone re-derives the same list (what a loader without layer_types would compute)
    d = cfg.to_dict()
    d.pop("layer_types")
    assert list(tf.Qwen2Config(**d).layer_types) == list(cfg.layer_types)
    assert pruned.shortllm_config_changes["max_window_layers"] == (3, 2)


def test_gemma3_pattern_not_expressible_layer_types_rewritten():
    model = make_tiny("gemma3_text", 6)
    old = list(model.config.layer_types)
    plan = make_plan(None, model=model, blocks=[1])  # drops a full-attention block: pattern 2 no longer fits
    pruned = prune(model, plan, inplace=False)
    assert list(pruned.config.layer_types) == [old[i] for i in plan.kept]
    assert "sliding_window_pattern" in pruned.shortllm_config_changes
    for block in get_adapter(pruned).blocks():
        assert block.self_attn.layer_type == pruned.config.layer_types[block.layer_idx]


def test_gpt2_inverse_layer_idx_scaling_folded():
    model = make_tiny("gpt2", 5, seed=2, dtype=torch.float64, scale_attn_by_inverse_layer_idx=True)
    batch = random_batch(2, 9, seed=6)
    plan = make_plan(None, model=model, blocks=[0, 2])
    ref = reference_logits(model, plan, batch)
    pruned = prune(model, plan, inplace=False)
    with torch.no_grad():
        got = pruned(**batch, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # and a model built fresh from the pruned config + weights computes the same (the scale lives in weights)
    fresh = tf.GPT2LMHeadModel(pruned.config).to(torch.float64).eval()
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch, use_cache=False).logits, ref, rtol=1e-10, atol=1e-10)


def test_prune_refuses_plan_of_another_model():
    model = make_tiny("llama", 6)
    plan = make_plan(None, model=model, blocks=[2])
    with pytest.raises(PlanError, match="6 blocks"):
        prune(make_tiny("llama", 5), plan)
    with pytest.raises(PlanError, match="other weights"):
        prune(make_tiny("llama", 6, seed=7), plan)
    with pytest.raises(PlanError, match="mistral"):
        prune(make_tiny("mistral", 6), plan)
    assert get_adapter(model).num_layers == 6


def test_width_baseline_shrinks_to_ratio_and_round_trips(tmp_path):
    from shortllm.pruning.width import width_prune

    model = make_tiny("llama", 4, seed=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    before = sum(p.numel() for p in model.parameters())
    batch = random_batch(2, 8, seed=3)
    w = width_prune(model, 0.3)
    after = sum(p.numel() for p in w.parameters())
    assert abs((before - after) / before - 0.3) < 0.02
    assert w.config.num_attention_heads == 2 and w.config.intermediate_size < 256
    w.save_pretrained(tmp_path / "w")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "w").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, w(**batch).logits, rtol=1e-5, atol=1e-5)
