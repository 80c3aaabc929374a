"""Pins on the transformers internals shortllm relies on without going through a public API.

Each test asserts the behaviour one shortllm module depends on and names that module in its failure
message, so that a transformers release that changes it fails here, loudly, instead of making
shortllm compute something else in silence (transformers 5.24 renamed the KV cache keyword of the
attention modules, and the fused model went on generating from an unused cache).
"""
from __future__ import annotations

import inspect
import sys

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import TINY_ARCHS, make_tiny, random_batch
from transformers.cache_utils import Cache, DynamicCache

from shortllm.model.adapters import get_adapter
from shortllm.model.hooks import block_input, block_output
from shortllm.pruning.fusion import CACHE_KWARGS, FUSABLE
from shortllm.pruning.removal import INDEX_ATTRS

TF_VERSION = Version(transformers.__version__)


def _record(modules, run):
    """Run `run()` with every module's calls recorded: {module index: [(args, kwargs, output), ...]}."""
    seen: dict[int, list] = {i: [] for i in range(len(modules))}
    pending: dict[int, tuple] = {}
    handles = []
    for i, mod in enumerate(modules):
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, k, i=i: pending.__setitem__(i, (a, dict(k))), with_kwargs=True))
        handles.append(mod.register_forward_hook(
            lambda m, a, k, out, i=i: seen[i].append((*pending.pop(i), out)), with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _returned_cache(out):
    """The KV cache a forward returned: `cache` from transformers 5.24 (`past_key_values` stays as an alias)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _caches_in(args, kwargs) -> list[str]:
    """Where Cache objects sit in a call: keyword names, and '#i' for positional argument i."""
    return ([f"#{i}" for i, a in enumerate(args) if isinstance(a, Cache)]
            + [k for k, v in kwargs.items() if isinstance(v, Cache)])


# ---- attention modules: what the fused model replaces ------------------------------------------------

@pytest.mark.parametrize("arch", FUSABLE)
def test_attention_call_the_fused_attention_must_accept(arch):
    model = make_tiny(arch, 2, seed=1)
    ad = get_adapter(model)
    attns = [ad.attn(b) for b in ad.blocks()]
    batch = random_batch(2, 7, seed=2, pad=False)
    seen = _record(attns, lambda: model(**batch, use_cache=True))
    expected = "cache" if TF_VERSION >= Version("5.24.0.dev0") else "past_key_values"
    who = "shortllm.pruning.fusion (FusedAttention / DroppedAttention replace this module)"
    for i, calls in seen.items():
        assert len(calls) == 1, f"{arch}: attention {i} ran {len(calls)} times in one forward; {who}"
        args, kwargs, out = calls[0]
        where = _caches_in(args, kwargs)
        assert where == [expected], (
            f"{arch}: the decoder layer handed its attention the KV cache as {where}, expected [{expected!r}] for "
            f"transformers {TF_VERSION}; {who} reads it under {CACHE_KWARGS}: update fusion.CACHE_KWARGS")
        params = inspect.signature(type(attns[i]).forward).parameters
        assert expected in params, f"{arch}: {type(attns[i]).__name__}.forward has no {expected!r} parameter; {who}"
        pe = kwargs.get("position_embeddings")
        assert isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe), (
            f"{arch}: the attention module must get position_embeddings=(cos, sin) by keyword; {who} applies "
            "the rotary itself from it")
        assert "attention_mask" in kwargs, f"{arch}: attention_mask must come by keyword; {who}"
        h = args[0] if args else kwargs.get("hidden_states")
        assert isinstance(h, torch.Tensor) and h.shape == (2, 7, model.config.hidden_size), (
            f"{arch}: the attention's hidden state is the first positional argument or hidden_states=; {who}")
        assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == h.shape, (
            f"{arch}: the decoder layer unpacks (attn_output, attn_weights) from its attention; {who} returns that")


@pytest.mark.parametrize("arch", FUSABLE)
def test_modeling_module_pieces_the_fused_attention_borrows(arch):
    """FusedAttention keeps the model's own rotary, attention function and attention attributes."""
    model = make_tiny(arch, 2, seed=1)
    ad = get_adapter(model)
    attn = ad.attn(ad.blocks()[0])
    src = sys.modules[type(attn).__module__]
    who = "shortllm.pruning.fusion.FusedAttention"
    for fn in ("apply_rotary_pos_emb", "eager_attention_forward"):
        assert callable(getattr(src, fn, None)), f"{arch}: {src.__name__}.{fn} is gone; {who} calls it"
    assert list(inspect.signature(src.apply_rotary_pos_emb).parameters)[:4] == ["q", "k", "cos", "sin"], \
        f"{arch}: apply_rotary_pos_emb(q, k, cos, sin) changed; {who}"
    for a in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling"):
        assert hasattr(attn, a), f"{arch}: {type(attn).__name__}.{a} is gone; {who} copies it"
    projs = ("qkv_proj", "o_proj") if arch == "phi3" else ("q_proj", "k_proj", "v_proj", "o_proj")
    assert all(isinstance(getattr(attn, p, None), torch.nn.Linear) for p in projs), \
        f"{arch}: expected Linear {projs} on the attention; {who} concatenates them"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS.get_interface("eager", src.eager_attention_forward) is src.eager_attention_forward
    assert model.config._attn_implementation == "eager", f"{who} dispatches on config._attn_implementation"
    if arch == "gemma2":
        assert "softcap" in inspect.signature(src.eager_attention_forward).parameters and \
            attn.attn_logit_softcapping == model.config.attn_logit_softcapping, \
            f"{who} passes attention.attn_logit_softcapping to the attention function as softcap="
    mlp = ad.mlp(ad.blocks()[0])
    if arch != "phi3":
        x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6,
                                       msg=f"{arch}: the MLP is no longer down(act(gate) * up); shortllm.pruning."
                                           "fusion.FusedMLP computes exactly that")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_placeholder_cache_updates_count_like_real_keys(arch):
    """A dropped attention branch writes one zero key/value of width 1 per token; the cache must report the
    same lengths and mask sizes as it does for real keys, since the model derives positions and the masks of
    a whole attention type from them."""
    model = make_tiny(arch, 2, seed=1)
    real, placeholder = DynamicCache(config=model.config), DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(0)
    for i in range(2):  # gemma2: a sliding and a full layer; 12 tokens > its window of 8
        for t in (12, 1, 1):  # prompt, then two decode steps
            k = torch.randn(2, 2, t, 16, generator=g)
            real.update(k, k, i, kwargs={})
            placeholder.update(torch.zeros(2, 1, t, 1), torch.zeros(2, 1, t, 1), i, kwargs={})
            got = (placeholder.get_seq_length(i), placeholder.get_mask_sizes(1, i))
            want = (real.get_seq_length(i), real.get_mask_sizes(1, i))
            assert got == want, (
                f"{arch}: layer {i} ({type(real.layers[i]).__name__}) reports (length, mask sizes) {got} for the "
                f"placeholder keys but {want} for real ones; shortllm.pruning.fusion.DroppedAttention relies on "
                "them being equal")


# ---- decoder blocks: what hooks and replay see ---------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_block_call_convention(arch):
    """Block i's input is the hidden state (first positional argument or hidden_states=), its output (or
    its first element) is block i+1's input; with use_cache=False no cache object reaches any block."""
    model = make_tiny(arch, 3, seed=1)
    blocks = get_adapter(model).blocks()
    batch = random_batch(2, 9, seed=3)
    seen = _record(blocks, lambda: model.base_model(**batch, use_cache=False))
    who = "shortllm.model.hooks (block_input / block_output) and shortllm.model.replay (BlockCall)"
    ins, outs = [], []
    for i in range(3):
        assert len(seen[i]) == 1, f"{arch}: block {i} ran {len(seen[i])} times in one forward; {who}"
        args, kwargs, out = seen[i][0]
        assert args or "hidden_states" in kwargs, f"{arch}: block {i} got no hidden state; {who}"
        assert not _caches_in(args, kwargs), (
            f"{arch}: block {i} got a KV cache under use_cache=False ({_caches_in(args, kwargs)}); "
            f"shortllm.model.replay captures calls that way and replays them many times")
        if arch in FUSABLE:
            assert "attention_mask" in kwargs and "position_embeddings" in kwargs, (
                f"{arch}: block {i} no longer gets attention_mask= and position_embeddings= from the base model; "
                "shortllm.model.replay replays each block with its captured mask (per attention type) and rotary")
        ins.append(block_input(args, kwargs))
        outs.append(block_output(out))
        assert ins[-1].shape == (2, 9, model.config.hidden_size), f"{arch}: block {i} input shape; {who}"
    for i in range(2):
        assert torch.equal(outs[i], ins[i + 1]), (
            f"{arch}: block {i}'s output is not block {i + 1}'s input; the scorer's collectors (shortllm.scoring."
            "collectors) pair h_in/h_out through shortllm.model.hooks")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_calls_an_instance_level_block_forward(arch):
    """replay's capture stubs and hooks.checkpointed_blocks replace `block.forward` on the instance."""
    model = make_tiny(arch, 2, seed=1)
    blk = get_adapter(model).blocks()[1]
    calls = []
    orig = blk.forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    blk.forward = spy
    try:
        with torch.no_grad():
            model(**random_batch(1, 5), use_cache=False)
    finally:
        del blk.forward
    assert calls == [1], (f"{arch}: the model did not call the instance attribute block.forward; "
                          "shortllm.model.replay and shortllm.model.hooks.checkpointed_blocks patch it there")


@pytest.mark.parametrize("arch", [*TINY_ARCHS, "opt_post_ln"])
def test_base_model_output_is_the_lm_head_input(arch):
    """out[0] of base_model is the head input (the engine's Taylor loss), equal to the adapter's head_input of
    the last block's raw output (the ppl replay), and the LM head on it gives the model's logits."""
    model = make_tiny(arch, 3, seed=4, dtype=torch.float64)
    ad = get_adapter(model)
    batch = random_batch(2, 8, seed=5)
    base = {}
    seen = _record([ad.blocks()[-1]], lambda: base.setdefault("out", model.base_model(**batch, use_cache=False)))
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    head_in = base["out"][0]
    last = block_output(seen[0][0][2])
    with torch.no_grad():
        torch.testing.assert_close(ad.head_input(last), head_in, rtol=1e-12, atol=1e-12,
                                   msg=f"{arch}: base_model(...)[0] is not final norm + projections of the last "
                                       "block; shortllm.model.adapters.Adapter.head_input mirrors it")
        hp = ad.head_params()
        z = torch.nn.functional.linear(head_in, hp["weight"], hp["bias"]) * hp["scale"]
        if hp["softcap"]:
            z = torch.tanh(z / hp["softcap"]) * hp["softcap"]
    torch.testing.assert_close(z, logits, rtol=1e-12, atol=1e-12,
                               msg=f"{arch}: logits != head(base_model(...)[0]); shortllm.scoring.engine.batch_loss "
                                   "and the ppl head (Adapter.head_params) compute the loss that way")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt"])
def test_output_hidden_states_are_the_block_inputs(arch):
    model = make_tiny(arch, 3, seed=4)
    blocks = get_adapter(model).blocks()
    batch = random_batch(2, 8, seed=5)
    out = {}
    seen = _record(blocks, lambda: out.setdefault(
        "o", model(**batch, output_hidden_states=True, use_cache=False)))
    hs = out["o"].hidden_states
    assert len(hs) == 4
    for i in range(3):
        args, kwargs, _ = seen[i][0]
        assert torch.equal(hs[i], block_input(args, kwargs)), (
            f"{arch}: hidden_states[{i}] is not block {i}'s input; shortllm.testing.reference (the scoring "
            "oracle) reads block inputs from output_hidden_states")


def test_opt_without_final_norm_keeps_the_attribute_as_none():
    model = make_tiny("opt_post_ln", 2)
    dec = model.model.decoder
    assert hasattr(dec, "final_layer_norm") and dec.final_layer_norm is None, (
        "OPT with do_layer_norm_before=False must keep final_layer_norm = None; shortllm.model.adapters "
        "(ArchSpec.final_norm_optional) tells a model built without a final norm from a wrong path that way")
    assert isinstance(dec.project_out, torch.nn.Linear) and isinstance(dec.project_in, torch.nn.Linear)


# ---- layer indices and per-layer config: what prune rewrites -------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_kv_cache_slot_is_the_attention_layer_idx(arch):
    """prune renumbers every index attribute in a kept block; the cache must follow those attributes, not the
    block's position in the layer list (else a pruned model's cache has holes or collides)."""
    model = make_tiny(arch, 2, seed=6)
    blocks = get_adapter(model).blocks()
    for i, blk in enumerate(blocks):
        found = [(type(m).__name__, a) for m in blk.modules() for a in INDEX_ATTRS if getattr(m, a, None) == i]
        assert found, f"{arch}: no module in block {i} carries {INDEX_ATTRS}; shortllm.pruning.removal renumbers them"
    batch = random_batch(1, 6, seed=7, pad=False)  # shorter than every sliding window: both slots hold all keys

    def cache_keys():
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        cache = _returned_cache(out)
        return [cache.layers[j].keys.clone() for j in range(2)]

    plain = cache_keys()

    def renumber(mapping):
        for blk in blocks:
            for m in blk.modules():
                for a in INDEX_ATTRS:
                    v = getattr(m, a, None)
                    if isinstance(v, int) and not isinstance(v, bool):
                        setattr(m, a, mapping[v])

    renumber({0: 1, 1: 0})
    try:
        swapped = cache_keys()
    finally:
        renumber({0: 1, 1: 0})
    assert torch.equal(swapped[0], plain[1]) and torch.equal(swapped[1], plain[0]), (
        f"{arch}: the KV cache slot no longer follows the attention's layer_idx; shortllm.pruning.removal._renumber")


def test_masks_follow_config_layer_types_at_forward_time():
    """layers_removed (ppl baseline) and prune rewrite config.layer_types; the base model must pick each block's
    mask from config.layer_types[i] on every forward, not from a type fixed when the block was built."""
    model = make_tiny("gemma2", 2, seed=1)
    blocks = get_adapter(model).blocks()
    batch = random_batch(1, 12, seed=2, pad=False)  # 12 > the sliding window (8): the two masks differ
    types = list(model.config.layer_types)
    assert len(set(types)) == 2

    def masks():
        seen = _record(blocks, lambda: model.base_model(**batch, use_cache=False))
        return [seen[i][0][1]["attention_mask"] for i in range(2)]

    before = masks()
    assert not torch.equal(before[0], before[1])
    model.config.layer_types = types[::-1]
    try:
        after = masks()
    finally:
        model.config.layer_types = types
    assert torch.equal(after[0], before[1]) and torch.equal(after[1], before[0]), (
        "the masks did not follow config.layer_types; shortllm.model.replay.layers_removed and shortllm.pruning."
        "removal.rewrite_config rely on transformers reading it at forward time")


def test_qwen2_reads_has_sliding_layers_at_forward_time():
    """prune refreshes Qwen2/3's has_sliding_layers (derived from layer_types at construction) because the
    forward reads the attribute, not the config."""
    model = make_tiny("qwen2", 4, seed=1)
    base = model.base_model
    assert base.has_sliding_layers == ("sliding_attention" in model.config.layer_types) is True
    base.has_sliding_layers = False
    try:
        with pytest.raises(KeyError):
            base(**random_batch(1, 5), use_cache=False)
    finally:
        base.has_sliding_layers = True
    with torch.no_grad():
        base(**random_batch(1, 5), use_cache=False)


def test_layer_types_derivation_and_precedence(tmp_path):
    """shortllm.pruning.removal.rewrite_config rewrites max_window_layers with Qwen2's rule (block i slides iff
    i >= max_window_layers), judges Gemma-3's sliding_window_pattern with its rule (block i slides iff
    (i + 1) % pattern), and relies on an explicit layer_types winning over both after a save/load."""
    q = transformers.Qwen2Config(num_hidden_layers=5, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert q.layer_types == ["sliding_attention" if i >= 2 else "full_attention" for i in range(5)], \
        "Qwen2's max_window_layers rule changed; shortllm.pruning.removal.rewrite_config"
    g = transformers.Gemma3TextConfig(num_hidden_layers=4, sliding_window_pattern=2, head_dim=16)
    assert g.layer_types == ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(4)], \
        "Gemma-3's sliding_window_pattern rule changed; shortllm.pruning.removal.rewrite_config"
    assert getattr(g, "sliding_window_pattern", None) == 2, \
        "shortllm.pruning.removal reads config.sliding_window_pattern"
    for cfg, kept in ((q, ["full_attention", "sliding_attention", "full_attention"]),
                      (g, ["sliding_attention", "sliding_attention", "full_attention"])):
        cfg.num_hidden_layers, cfg.layer_types = 3, kept  # what prune writes; neither rule derives this list
        d = tmp_path / cfg.model_type
        cfg.save_pretrained(d)
        back = transformers.AutoConfig.from_pretrained(d)
        assert back.layer_types == kept and back.num_hidden_layers == 3, (
            f"{cfg.model_type}: a saved layer_types did not survive reload; shortllm.pruning.removal writes the "
            "kept blocks' types there")


def test_derived_layer_lists_never_reads_transformers_own_properties(monkeypatch):
    """Pruning looks for per-layer lists that configs compute as properties (Jamba's layers_block_type); it skips
    PretrainedConfig's own properties, whose deprecated aliases (torch_dtype, use_return_dict) log a warning the
    user did not cause. Fails if transformers moves those aliases or pruning starts reading them."""
    from transformers.configuration_utils import logger

    from shortllm.model.layer_config import derived_layer_lists

    said: list[str] = []
    monkeypatch.setattr(logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)))
    monkeypatch.setattr(logger, "warning", lambda msg, *a, **k: said.append(str(msg)))
    llama = transformers.LlamaConfig(num_hidden_layers=4)
    assert derived_layer_lists(llama, 4) == {} and said == [], said
    llama.torch_dtype  # the alias still warns: otherwise this test checks nothing  # noqa: B018
    assert any("deprecated" in s for s in said), said
    jamba = transformers.JambaConfig(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1)
    assert derived_layer_lists(jamba, 4)["layers_block_type"] == ["mamba", "attention", "mamba", "attention"]
