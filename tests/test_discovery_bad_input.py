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
