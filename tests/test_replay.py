"""Block replay: captured calls reproduce the model's own forward and physical deletion; branch zeroing."""
import copy

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.arch import get_adapter
from shortllm.hooks import block_output
from shortllm.ppl import delete_blocks_copy, mean_nll_full
from shortllm.replay import BlockCall, capture_calls, layers_removed, run_blocks, zeroed_branches


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
