"""Block replay: captured calls reproduce the model's own forward and physical deletion; branch zeroing;
post-layer-norm OPT (replay + head input) through scoring, pruning and export."""
import copy
import math

import pytest
import torch
from tiny_models import make_tiny, random_batch
from transformers import AutoModelForCausalLM

from shortllm.errors import UnsupportedModelError
from shortllm.model.adapters import get_adapter
from shortllm.model.hooks import block_output
from shortllm.model.replay import BlockCall, capture_calls, layers_removed, run_blocks, zeroed_branches
from shortllm.pruning.exporting import export
from shortllm.pruning.fusion import fuse
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune
from shortllm.scoring.engine import score_fast
from shortllm.scoring.ppl import delete_blocks_copy, mean_nll_full
from shortllm.testing.reference import score_reference


def _last_block_output(model, batch):
    out = []
    blocks = get_adapter(model).blocks()
    h = blocks[-1].register_forward_hook(lambda m, a, o: out.append(block_output(o)))
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        h.remove()
    return out[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox"])
def test_replay_reproduces_forward(arch):
    model = make_tiny(arch, num_layers=3, seed=2)
    batch = random_batch(3, 19, seed=4)  # right-padded rows of different lengths; 19 > sliding window 8
    adapter = get_adapter(model)
    h0, calls = capture_calls(model, adapter, batch["input_ids"], batch["attention_mask"])
    assert all(isinstance(c, BlockCall) for c in calls) and len(calls) == 3
    assert all(c.args[:1] in ((None,), ()) for c in calls), "captured calls must not keep hidden states"
    with torch.no_grad():
        got = run_blocks(adapter.blocks(), calls, h0, range(3))
    want = _last_block_output(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the capture stubs are gone: the model runs its real blocks again
    assert all("forward" not in blk.__dict__ for blk in adapter.blocks())


def test_capture_restores_an_existing_forward_patch():
    model = make_tiny("llama", num_layers=2)
    adapter = get_adapter(model)
    blk = adapter.blocks()[1]
    calls_seen = []
    orig = blk.forward

    def wrapped(*a, **k):
        calls_seen.append(1)
        return orig(*a, **k)

    blk.forward = wrapped
    batch = random_batch(2, 7)
    capture_calls(model, adapter, batch["input_ids"], batch["attention_mask"])
    assert blk.__dict__["forward"] is wrapped, "an instance-level forward patch must survive a capture pass"


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_replay_skip_equals_deletion_with_rewritten_layer_types(arch):
    """Skipping block i in replay == deleting it with `layer_types` rewritten; NOT == a stale `layer_types`."""
    model = make_tiny(arch, num_layers=4, seed=1, dtype=torch.float64)
    types = model.config.layer_types
    assert len(set(types)) == 2, f"the tiny {arch} must mix attention types for this test to mean anything: {types}"
    batch = random_batch(2, 21, seed=5)
    adapter = get_adapter(model)
    i = next(j for j in range(3) if types[j] != types[j + 1])  # deletion shifts the later types
    h0, calls = capture_calls(model, adapter, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        got = run_blocks(adapter.blocks(), calls, h0, [j for j in range(4) if j != i])
    ref = delete_blocks_copy(model, [i])
    want = _last_block_output(ref, batch)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    stale = copy.deepcopy(model)
    del get_adapter(stale).blocks()[i]
    stale.config.num_hidden_layers = 3
    stale.config.layer_types = types[:3]
    assert not torch.allclose(_last_block_output(stale, batch), want, atol=1e-6), \
        "a deletion that keeps the stale layer_types must change the output (else this test proves nothing)"


def test_layers_removed_matches_physical_deletion_and_restores():
    model = make_tiny("gemma2", num_layers=4, seed=3, dtype=torch.float64)
    adapter = get_adapter(model)
    data = [random_batch(2, 15, seed=6)]
    types, blocks = list(model.config.layer_types), list(adapter.blocks())
    with layers_removed(model, adapter, [0, 2]):
        assert model.config.num_hidden_layers == 2 and model.config.layer_types == [types[1], types[3]]
        got = mean_nll_full(model, data)
    assert model.config.num_hidden_layers == 4 and model.config.layer_types == types
    assert list(adapter.blocks()) == blocks
    assert got == pytest.approx(mean_nll_full(delete_blocks_copy(model, [0, 2]), data), rel=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_zeroed_branches_equals_zero_weights(arch):
    """Tuple-returning attention modules (first element zeroed) and biased output projections."""
    model = make_tiny(arch, num_layers=2, seed=4, dtype=torch.float64)
    adapter = get_adapter(model)
    data = [random_batch(2, 9, seed=7)]
    ref = copy.deepcopy(model)
    ra = get_adapter(ref)
    with torch.no_grad():
        for mod in (ra.attn_out(ra.blocks()[1]), ra.mlp_out(ra.blocks()[0])):
            assert mod.bias is not None, "this test is about biased projections"
            mod.weight.zero_()
            mod.bias.zero_()
    base = mean_nll_full(model, data)
    with zeroed_branches(adapter, [("attn", 1), ("mlp", 0)]):
        got = mean_nll_full(model, data)
    assert got == pytest.approx(mean_nll_full(ref, data), rel=1e-12)
    assert mean_nll_full(model, data) == base, "hooks must be removed on exit"
    with pytest.raises(ValueError):
        with zeroed_branches(adapter, [("ffn", 0)]):
            pass


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt", "gpt_neox"])
def test_replay_of_a_cached_call_leaves_the_cache_alone(arch):
    """A block call captured while the model fills a KV cache (under whatever name or position the running
    transformers passes it: `cache=` from 5.24, `past_key_values=` before, GPT-2 positionally, GPT-NeoX as
    `layer_past=`) replays like the model's own forward, any number of times, and never writes the cache."""
    model = make_tiny(arch, num_layers=3, seed=5)
    batch = random_batch(2, 11, seed=8, pad=False)
    blk = get_adapter(model).blocks()[1]
    seen = {}

    def pre(_m, args, kwargs):
        seen["call"] = (args, dict(kwargs))

    def post(_m, _args, _kwargs, out):
        seen["out"] = block_output(out)

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    # transformers 5.24 returns the cache as `cache` (`past_key_values` stays as a deprecated alias)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    assert cache is not None and cache.get_seq_length() == 11, "the forward must have filled a KV cache"
    args, kwargs = seen["call"]
    h_in = args[0] if args else kwargs["hidden_states"]
    call = BlockCall.from_call(args, kwargs)
    with torch.no_grad():
        first, second = call.run(blk, h_in), call.run(blk, h_in)
    torch.testing.assert_close(first, seen["out"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, seen["out"], rtol=1e-6, atol=1e-6)
    assert cache.get_seq_length() == 11, "a replay wrote into the model's KV cache"


# ---- post-layer-norm OPT (opt-350m layout) end to end -------------------------------------------------
# No final norm (final_layer_norm is None), project_in/project_out around the blocks, blocks that end in a
# LayerNorm of the residual stream. The ppl metric replays the blocks and then needs the adapter's head input,
# so this path is what these tests exercise first; scoring, pruning and export follow through their public
# functions.

def _raw_last_block_output_and_logits(model, batch):
    got = []
    blk = get_adapter(model).blocks()[-1]
    h = blk.register_forward_hook(lambda m, a, o: got.append(block_output(o)))
    try:
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
    finally:
        h.remove()
    return got[0], logits


def _delete_blocks(model, drop):
    """The oracle of a block removal, written out for OPT: the blocks deleted from the layer list."""
    ref = copy.deepcopy(model)
    layers = ref.model.decoder.layers
    for i in sorted(drop, reverse=True):
        del layers[i]
    for j, layer in enumerate(layers):
        layer.self_attn.layer_idx = j
    ref.config.num_hidden_layers = len(layers)
    return ref


@pytest.mark.parametrize("arch,overrides", [
    ("opt_post_ln", {}),  # no final norm, then project_out
    ("opt", {"_remove_final_layer_norm": True, "word_embed_proj_dim": 32}),  # pre-LN blocks, final norm removed
    ("opt", {"word_embed_proj_dim": 32}),  # final norm, then project_out
])
def test_opt_head_input_reproduces_the_models_logits(arch, overrides):
    model = make_tiny(arch, num_layers=3, seed=9, dtype=torch.float64, **overrides)
    adapter = get_adapter(model)
    assert (adapter.final_norm() is None) == (model.model.decoder.final_layer_norm is None)
    assert model.model.decoder.project_out is not None, "the tiny config must exercise project_out"
    h, logits = _raw_last_block_output_and_logits(model, random_batch(2, 9, seed=3))
    with torch.no_grad():
        got = adapter.lm_head()(adapter.head_input(h))
    torch.testing.assert_close(got, logits, rtol=1e-12, atol=1e-12)
    with pytest.raises(UnsupportedModelError, match="no final norm"):
        get_adapter(model, final_norm="model.decoder.no_such_norm")  # an optional norm is not a wrong path


def test_opt_post_ln_scores_match_references():
    model = make_tiny("opt_post_ln", num_layers=5, seed=4, dtype=torch.float64)
    model.set_attn_implementation("sdpa")  # eager softmax runs in float32 even for float64 models
    data = [random_batch(3, 17, seed=21), random_batch(2, 11, seed=22)]
    got = score_fast(model, data, metrics=("bi", "angular", "taylor", "mag", "ppl"), n_max=3, progress=False)
    want = score_reference(model, data, metrics=("bi", "angular", "taylor", "mag"), n_max=3)
    for m in ("bi", "angular", "taylor", "mag"):
        torch.testing.assert_close(got.values[m], want[m], rtol=1e-9, atol=0, equal_nan=True, msg=m)
    ppl = torch.tensor([math.exp(mean_nll_full(_delete_blocks(model, [i]), data)) for i in range(5)],
                       dtype=torch.float64)
    torch.testing.assert_close(got.values["ppl"], ppl, rtol=1e-11, atol=0)
    assert len(set(ppl.tolist())) == 5, "blocks must differ, else the ppl comparison is vacuous"


def test_opt_post_ln_prune_export_reload_and_generate(tmp_path):
    model = make_tiny("opt_post_ln", num_layers=5, seed=6, dtype=torch.float64)
    batch = random_batch(2, 12, seed=5)
    _, want = _raw_last_block_output_and_logits(_delete_blocks(model, [1, 3]), batch)
    pruned = prune(model, make_plan(None, model=model, blocks=[1, 3]), inplace=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch, use_cache=False).logits, want, rtol=1e-12, atol=1e-12)
    out = export(pruned, tmp_path / "opt350m-like")
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64, attn_implementation="eager").eval()
    assert back.model.decoder.final_layer_norm is None and not back.config.do_layer_norm_before
    assert back.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(back(**batch, use_cache=False).logits, want, rtol=1e-12, atol=1e-12)
    ids = random_batch(2, 6, seed=7, pad=False)["input_ids"]
    with torch.no_grad():
        gen = back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                            do_sample=False, use_cache=True, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True)
        oracle = back(input_ids=gen.sequences, use_cache=False).logits[:, 5:-1]  # position 5 + s predicts step s
        uncached = back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                 do_sample=False, use_cache=False, pad_token_id=0)
    # generate hands out float32 logits, whatever the model's dtype
    torch.testing.assert_close(torch.stack(gen.logits, 1), oracle.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(gen.sequences, uncached), "cached generation differs from uncached"


def test_opt_post_ln_refuses_branch_removal():
    """A zeroed branch of a post-LN block still passes the stream through the block's LayerNorm: not a removal."""
    model = make_tiny("opt_post_ln", num_layers=4, seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(None, model=model, blocks=[1], branches=[("attn", 0)])
    with pytest.raises(UnsupportedModelError, match="Remove whole blocks"):
        prune(model, plan)
    assert get_adapter(model).num_layers == 4 and getattr(model, "shortllm_plan", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused prune changed weights"
    with pytest.raises(UnsupportedModelError, match="Remove whole blocks"):
        with zeroed_branches(get_adapter(model), [("mlp", 2)]):
            pass
    with pytest.raises(UnsupportedModelError, match="export it unfused"):
        fuse(model)
