"""Models shortllm cannot depth-prune get a typed error naming the problem and the fix, and nothing is written:
encoder-only (BERT), encoder-decoder (BART's seq2seq model and its decoder-as-causal-LM), and a model whose
blocks cannot be found (the error names the override to pass)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from shortllm.cli.app import main
from shortllm.errors import UnsupportedModelError
from shortllm.model.adapters import get_adapter

SMALL = dict(vocab_size=64, max_position_embeddings=32)


def bert():
    return tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, **SMALL))


def bart_seq2seq():
    return tf.BartForConditionalGeneration(tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                                                         encoder_attention_heads=2, decoder_attention_heads=2,
                                                         encoder_ffn_dim=64, decoder_ffn_dim=64, **SMALL))


def bart_decoder():
    # AutoModelForCausalLM maps "bart" to this: the decoder half of an encoder-decoder model
    return tf.BartForCausalLM(tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, **SMALL))


@pytest.mark.parametrize("build", [bert, bart_seq2seq, bart_decoder])
def test_encoder_and_encoder_decoder_models_are_refused(build, tmp_path, capsys):
    model = build().eval()
    with pytest.raises(UnsupportedModelError, match="not a decoder-only causal LM") as e:
        get_adapter(model)
    assert "get_adapter(model, blocks=" in str(e.value)  # the fix for a decoder-only model it does not know
    if build is bert:
        return  # AutoModelForCausalLM cannot load a masked-LM checkpoint at all
    model.save_pretrained(tmp_path / "m")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert "not a decoder-only" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "m"), "--blocks", "1", "-o", str(tmp_path / "out")]) == 2
    assert "not a decoder-only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_blocks_not_found_names_the_override():
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.config.model_type = "not_in_the_registry"
    # the blocks are no longer a list of config.num_hidden_layers modules (kept as plain attributes)
    model.model.first, model.model.second = model.model.layers
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match="no nn.ModuleList of 2 blocks") as e:
        get_adapter(model)
    assert "get_adapter(model, blocks=" in str(e.value) and "register(" in str(e.value)
    # the override named there works: the caller points at the blocks it knows
    model.model.layers = torch.nn.ModuleList([model.model.first, model.model.second])
    assert get_adapter(model, blocks="model.layers", final_norm="model.norm").num_layers == 2


def test_a_removal_that_breaks_a_derived_layer_pattern_is_refused():
    """Jamba computes its MoE layers from expert_layer_period/offset (a property, not a stored list): removing
    block 2 of [dense, MoE, dense, MoE] would make the old block 3 dense in the reloaded model. Refused before
    the model is touched; a removal that keeps the pattern (the last two blocks) goes through."""
    from shortllm.errors import PlanError
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.removal import prune

    cfg = tf.JambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                         attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
                         mamba_d_state=4, mamba_expand=1, mamba_dt_rank=4, use_mamba_kernels=False)
    torch.manual_seed(0)
    model = tf.JambaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="computed from a layer pattern"):
        prune(model, make_plan(None, model=model, blocks=[2]), inplace=True)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruned = prune(model, make_plan(None, model=model, blocks=[2, 3]), inplace=False)
    assert pruned.config.layers_block_type == ["attention", "mamba"]
    assert pruned.config.layers_num_experts == [1, 2]
