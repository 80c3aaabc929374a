"""Architecture discovery (shortllm.model.discovery), the registry-first fallback in get_adapter, generic
per-layer config rewriting in prune, and `shortllm inspect`."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TINY_ARCHS, make_tiny, random_batch

import shortllm.model.discovery as discovery
from shortllm.cli.app import main
from shortllm.errors import UnsupportedModelError
from shortllm.model.adapters import REGISTRY, get_adapter
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune, rewrite_config
from shortllm.scoring.engine import score_fast

FIELDS = ("blocks", "final_norm", "lm_head", "attn", "attn_out", "mlp", "mlp_out")


def _unregistered(arch: str, num_layers: int = 4, **kw):
    """A registered architecture whose model_type the registry does not know: discovery must find it alone."""
    model = make_tiny(arch, num_layers, **kw)
    model.config.model_type = f"unknown_{arch}"
    return model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_discovery_agrees_with_the_hand_written_registry(arch):
    spec = REGISTRY[arch]
    found = discovery.discover(make_tiny(arch, 3)).spec_fields
    for f in FIELDS:
        if arch == "opt" and f in ("mlp", "mlp_out"):
            # the registry names fc2 for both (OPT has no MLP container); discovery finds no MLP-like child
            continue
        assert found[f] == getattr(spec, f), f"{arch}.{f}: discovered {found[f]!r}, registry {getattr(spec, f)!r}"
    assert found["num_layers_key"] == spec.num_layers_key
    assert set(found["embeddings"]) <= set(spec.embeddings) and found["embeddings"]


def test_registry_wins_and_discovery_never_runs_for_it(monkeypatch):
    def boom(model):
        raise AssertionError("discovery ran for a registered model_type")

    monkeypatch.setattr(discovery, "discover", boom)
    for arch in TINY_ARCHS:
        assert get_adapter(make_tiny(arch, 2)).spec is REGISTRY[arch]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_discovered_adapter_scores_like_the_registry(arch):
    # the same weights scored through the registry entry and through discovery: every metric identical
    model = make_tiny(arch, 4, seed=5)
    data = [random_batch(2, 9, seed=3)]
    metrics = ("bi", "taylor", "mag", "ppl")
    ref = score_fast(model, data, metrics=metrics, progress=False)
    model.config.model_type = f"unknown_{arch}"
    assert get_adapter(model).spec.notes.startswith("discovered")
    got = score_fast(model, data, metrics=metrics, progress=False)
    for m in metrics:
        torch.testing.assert_close(got.per_block(m), ref.per_block(m), rtol=1e-6, atol=1e-9)


def test_model_without_final_norm_is_found_as_such():
    # opt-350m layout: post-LN blocks, final_layer_norm is None
    model = _unregistered("opt_post_ln", 3)
    ad = get_adapter(model)
    assert ad.spec.final_norm == "" and ad.final_norm() is None
    assert [type(m).__name__ for m in ad.head_extra()] == ["Linear"]  # project_out


def test_moe_like_branch_gets_no_output_projection():
    # an MLP whose output is a SUM of two projections: zeroing one would not remove the branch
    model = _unregistered("llama", 2)

    class TwoExperts(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.a, self.b = mlp, torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    for block in model.model.layers:
        block.mlp = TwoExperts(block.mlp)
    ad = get_adapter(model)
    assert ad.spec.mlp == "mlp" and ad.spec.mlp_out == ""
    assert ad.spec.attn_out == "self_attn.o_proj"


def test_in_place_sum_of_branch_outputs_is_not_taken_for_a_projection():
    # Llama-4's MoE adds the routed experts INTO the shared expert's output tensor: the projection's output,
    # as returned, is not the branch output
    model = _unregistered("llama", 2)

    class SharedPlusRouted(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.shared, self.routed = mlp, torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            out = self.shared(x)
            out.add_(self.routed(x))
            return out

    for block in model.model.layers:
        block.mlp = SharedPlusRouted(block.mlp)
    assert get_adapter(model).spec.mlp_out == ""


def test_base_model_that_is_the_causal_lm_itself_is_refused():
    model = _unregistered("llama", 2)
    model.base_model_prefix = "language_model"  # names no submodule: base_model falls back to the model
    with pytest.raises(UnsupportedModelError, match="base_model"):
        get_adapter(model)


def test_head_module_outside_the_base_model_is_refused():
    # ModernBERT-decoder layout: a prediction head between model.base_model and the LM head. The head check
    # alone would pass (the extra module is replayed), but the scorer feeds base_model's output to the head
    model = _unregistered("llama", 2)
    model.pre_head = torch.nn.Linear(64, 64)

    def forward(self, input_ids=None, attention_mask=None, **kw):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)[0]
        return type("Out", (), {"logits": self.lm_head(self.pre_head(h))})()

    model.forward = forward.__get__(model)
    with pytest.raises(UnsupportedModelError, match="not the input of the LM head"):
        get_adapter(model)


def test_blocks_that_do_not_match_the_layer_count_are_a_typed_error():
    model = _unregistered("llama", 3)
    model.config.num_hidden_layers = 5  # no list of 5 blocks exists
    with pytest.raises(UnsupportedModelError, match=r"blocks=") as e:
        get_adapter(model)
    assert "of 5 blocks" in str(e.value)


def test_unreproduced_logit_transform_is_refused():
    # a head that scales logits in a way head_params does not know: Taylor/PPL would score another model
    model = _unregistered("llama", 2)
    orig = type(model).forward

    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        out.logits = out.logits * 2.0
        return out

    model.forward = forward.__get__(model)
    with pytest.raises(UnsupportedModelError, match="final_norm="):
        get_adapter(model)


def test_encoder_models_stay_refused():
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    with pytest.raises(UnsupportedModelError, match="not a decoder-only"):
        get_adapter(tf.BertLMHeadModel(cfg))


def test_rewrite_config_filters_per_layer_lists_and_remaps_index_lists():
    model = make_tiny("llama", 5)
    cfg = model.config
    cfg.mlp_only_layers = [1, 3]           # indices: 1 stays (-> 1), 3 is removed
    cfg.full_attn_layer_ids = [0, 2, 4]    # indices: 0 -> 0, 2 -> 1, 4 -> 3
    cfg.rope_scales = [1.0, 2.0, 3.0, 4.0, 5.0]   # one value per layer, no "layer" in the name
    cfg.attn_layers = [0, 1, 2, 3, 4]      # index list of length L: remapped, not filtered
    cfg.architectures = ["A", "B", "C", "D", "E"]
    cfg.eos_token_id = [2, 2, 2, 2, 2]
    plan = make_plan(None, model=model, blocks=[3])
    changes = rewrite_config(cfg, plan)
    assert cfg.mlp_only_layers == [1]
    assert cfg.full_attn_layer_ids == [0, 2, 3]
    assert cfg.rope_scales == [1.0, 2.0, 3.0, 5.0]
    assert cfg.attn_layers == [0, 1, 2, 3]
    assert cfg.architectures == ["A", "B", "C", "D", "E"] and cfg.eos_token_id == [2] * 5
    assert cfg.num_hidden_layers == 4
    assert changes["mlp_only_layers"] == ([1, 3], [1])


def test_rewrite_config_leaves_sub_configs_alone():
    import transformers as tf

    cfg = tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         vocab_size=64)
    cfg.text_config = {"layer_types": ["a", "b", "c", "d"]}
    plan = make_plan(None, model=make_tiny("llama", 4), blocks=[0])
    rewrite_config(cfg, plan)
    assert cfg.text_config == {"layer_types": ["a", "b", "c", "d"]}


def test_prune_of_a_discovered_model_writes_its_own_layer_key(tmp_path):
    # GPT-2 stores n_layer; an unregistered GPT-2 must still get n_layer rewritten
    model = _unregistered("gpt2", 4)
    pruned = prune(model, make_plan(None, model=model, blocks=[1]), inplace=False)
    assert pruned.config.to_dict()["n_layer"] == 3


def test_inspect_cli_json_and_text(tmp_path, capsys):
    d = tmp_path / "m"
    model = make_tiny("llama", 3)
    model.save_pretrained(d)
    assert main(["inspect", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "registry" and out["blocks"] == {"path": "model.layers", "count": 3,
                                                             "config_key": "num_hidden_layers", "config_path": ""}
    assert out["branches"][0]["experts"] == []  # a dense block
    assert out["final_norm"] == "model.norm" and len(out["branches"]) == 3
    assert out["branches"][0]["attn_out"] == "self_attn.o_proj"
    assert main(["inspect", str(d)]) == 0
    assert "model.layers  x3" in capsys.readouterr().out


def test_inspect_cli_discovered_type(tmp_path, capsys):
    import transformers as tf

    cfg = tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2)
    tf.BloomForCausalLM(cfg).save_pretrained(tmp_path / "b")
    assert main(["inspect", str(tmp_path / "b"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "discovered"
    assert out["blocks"]["path"] == "transformer.h" and out["blocks"]["count"] == 2
    assert out["final_norm"] == "transformer.ln_f"
    assert "transformer.word_embeddings" in out["embeddings"]
    b = out["branches"][1]
    assert b["attn"] == "self_attention" and b["mlp"] == "mlp"
    # Bloom adds the residual INSIDE both branches (dropout_add(dense(x), residual)): zeroing dense_4h_to_h
    # would leave the residual, so no output projection may be reported
    assert b["attn_out"] is None and b["mlp_out"] is None


def test_inspect_passes_trust_remote_code_only_when_asked(monkeypatch, tmp_path):
    import shortllm.model.loading as loading

    seen = []

    def fake(name, **kw):
        seen.append(kw.get("trust_remote_code"))
        raise UnsupportedModelError("stop here")

    monkeypatch.setattr(loading, "load_model", fake)
    assert main(["inspect", "some/model"]) == 2
    assert main(["inspect", "some/model", "--trust-remote-code"]) == 2
    assert seen == [False, True]
